"""``train(config, workdir)``: the one training loop, for every task.

Order of work (everything that can reject the config runs before anything compiles):

1. ``setup``: the mesh, the config validated, the task (and its model config) built; abstract
   init -> shardings -> jitted init with ``out_shardings`` (params are born sharded); the step
   is jitted with in/out shardings, donates the old state, and is compiled ahead of time once
   (its per-device memory is printed); ``Setup.datasets`` gives this process's rows of every
   batch;
2. load the frozen parameters (``Setup.frozen``); restore the latest checkpoint of ``workdir``
   (state and data position) or initialize: from ``config.init_from``'s parameters if set, then
   the task's ``prepare`` on the first batch;
3. loop: dispatch step t+1, then fetch the metrics of step t (host and device overlap); every
   step's loss, gradient norm and parameter norm must be finite, else the run stops without
   saving; eval, checkpoint and log on their schedules; SIGTERM saves and returns;
4. final checkpoint, eval and a text sample.

``restore``, ``experiments/aot.py`` (the same step compiled for a TPU topology) and the activation
cache (``training/activations.py``) use the same ``setup``.
"""

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax

from flaxseed.data import pipeline
from flaxseed.models import hf
from flaxseed.models import transformer
from flaxseed.training import checkpoint as checkpoint_lib
from flaxseed.training import mesh as mesh_lib
from flaxseed.training import metrics as metrics_lib
from flaxseed.training import optim
from flaxseed.training import step as step_lib
from flaxseed.training import tasks as tasks_lib
from flaxseed.training import workdir as workdir_lib
from flaxseed.training.state import TrainState

POSITIVE_KEYS = ("steps", "batch_size", "seq_len", "log_every", "eval_batches", "max_to_keep")
NON_NEGATIVE_KEYS = ("eval_every", "checkpoint_every", "sample_tokens")


class NonFiniteLossError(RuntimeError):
  """The loss, gradient or parameters became inf/NaN; no checkpoint was written for that step."""


def validate(config, mesh: Mesh) -> None:
  """Rejects bad values with a ValueError naming the key (runs before anything compiles)."""
  for key in POSITIVE_KEYS:
    if config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]} must be positive")
  for key in NON_NEGATIVE_KEYS:
    if config[key] < 0:
      raise ValueError(f"config.{key}={config[key]} must be >= 0")
  optim.validate(config.optim)
  if config.get("init_from") and not hf.is_folder(config.init_from):
    checkpoint_lib.require_checkpoint(config.init_from, "config.init_from")
  divisor = mesh_lib.batch_divisor(mesh) * config.optim.accum_steps
  if config.batch_size % divisor:
    raise ValueError(
      f"config.batch_size={config.batch_size} must be divisible by mesh.data x mesh.fsdp x "
      f"optim.accum_steps = {mesh.shape['data']} x {mesh.shape['fsdp']} x "
      f"{config.optim.accum_steps} = {divisor}"
    )


@dataclasses.dataclass
class Setup:
  """Everything compiled or derived from (config, task, mesh), shared by train and AOT."""

  config: Any  # the ConfigDict it was built from
  mesh: Mesh
  task: tasks_lib.Task
  rules: tuple
  schedule: Any
  batch_spec: dict  # global batch: ShapeDtypeStruct with shardings
  abstract_state: TrainState  # ShapeDtypeStruct leaves with shardings
  abstract_frozen: Any
  init: Any  # jitted () -> state, born sharded
  init_frozen: Any  # jitted () -> frozen, freshly initialized
  prepare: Any  # jitted (state, frozen, batch) -> state: the task's data-dependent init, or None
  with_params: Any  # jitted (state, params) -> state with those params and a fresh optimizer
  train_step: Any  # jitted (state, frozen, batch) -> (state, metrics), state donated
  eval_step: Any  # jitted (params, frozen, batch, task_state) -> {name: (sum, count)}

  def context(self):
    """Mesh + logical-axis rules for tracing model code (activation constraints)."""
    return _context(self.mesh, self.rules)

  def frozen(self):
    """The frozen parameters: loaded by the task (``task.load_frozen(abstract_frozen)``, e.g. a
    trained model from another run; ``None`` from it means none to load) or freshly initialized."""
    loaded = self.task.load_frozen(self.abstract_frozen)
    return self.init_frozen() if loaded is None else loaded

  def datasets(self):
    """This process's (train, eval) grain datasets: its rows of every global batch."""
    config = self.config
    rows = pipeline.process_rows(self.batch_spec["tokens"].sharding, config.batch_size)
    return self.task.datasets(
      global_batch=config.batch_size,
      rows=rows,
      train_batches=config.steps,
      eval_batches=config.eval_batches,
      seed=config.seed,
    )


@contextlib.contextmanager
def _context(mesh: Mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _with_shardings(abstract, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def setup(config, *, devices=None) -> Setup:
  """The one setup sequence of ``train``, ``restore``, ``experiments/aot.py`` and the activation
  cache: the mesh over ``devices`` (default: all; a TPU topology's for AOT), the config
  validated, the task built, shardings and jitted functions. Compiles nothing yet.
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  validate(config, mesh)
  return _setup(config, tasks_lib.build(config), mesh)


def _setup(config, task: tasks_lib.Task, mesh: Mesh) -> Setup:
  """Shardings and jitted functions of ``task`` on ``mesh``: abstract init -> shardings -> jitted
  init with ``out_shardings``. The task's hooks (``training/tasks/base.py``) shape the state:
  ``wrap_optimizer``, ``init_state`` (the ``task_state``, replicated), ``prepare`` (jitted only
  where the task defines it) and ``load_frozen`` (``Setup.frozen``)."""
  rules = tuple(tuple(r) for r in config.logical_axis_rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch_spec = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
    for k, v in task.batch_spec(config.batch_size).items()
  }
  schedule = optim.schedule(config.optim, config.steps)
  optimizer = optim.make_optimizer(config.optim, config.steps)
  optimizer = task.wrap_optimizer(optimizer)
  init_task_state = task.init_state
  base_rng = jax.random.PRNGKey(config.seed)
  init_rng, train_rng = jax.random.split(base_rng)

  def init_boxed():
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
    return task.init(init_rng, batch)

  with _context(mesh, rules):
    boxed_params, boxed_frozen = jax.eval_shape(init_boxed)
  param_shardings = mesh_lib.logical_shardings(boxed_params, mesh, rules)
  frozen_shardings = mesh_lib.logical_shardings(boxed_frozen, mesh, rules)
  abstract_params = nn.unbox(boxed_params)
  if config.get("keep_zeros", ""):  # a sparse fine-tune (models/prune.py): zeros stay zero
    optimizer = optax.chain(optimizer, optim.keep_zeros(config.keep_zeros, abstract_params))
  mesh_lib.check_divisible(abstract_params, param_shardings)
  mesh_lib.check_divisible(nn.unbox(boxed_frozen), frozen_shardings, what="frozen parameter")
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  state_shardings = TrainState(
    step=replicated,
    params=param_shardings,
    opt_state=optim.state_shardings(optimizer, abstract_opt_state, param_shardings, mesh),
    rng=replicated,
    task_state=jax.tree.map(lambda _: replicated, jax.eval_shape(init_task_state)),
  )

  def init():
    params = nn.unbox(init_boxed()[0])
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=train_rng,
      task_state=init_task_state(),
    )

  def prepare(state, frozen, batch):
    params, task_state = task.prepare(state.params, state.task_state, frozen, batch)
    return state.replace(params=params, opt_state=optimizer.init(params), task_state=task_state)

  def with_params(state, params):
    return state.replace(params=params, opt_state=optimizer.init(params))

  abstract_state = _with_shardings(jax.eval_shape(init), state_shardings)
  abstract_frozen = _with_shardings(nn.unbox(boxed_frozen), frozen_shardings)

  train_step = step_lib.make_train_step(
    task, optimizer, schedule, accum_steps=config.optim.accum_steps
  )
  batch_shardings = {k: batch_sharding for k in batch_spec}
  return Setup(
    config=config,
    mesh=mesh,
    task=task,
    rules=rules,
    schedule=schedule,
    batch_spec=batch_spec,
    abstract_state=abstract_state,
    abstract_frozen=abstract_frozen,
    init=jax.jit(init, out_shardings=state_shardings),
    init_frozen=jax.jit(lambda: nn.unbox(init_boxed()[1]), out_shardings=frozen_shardings),
    prepare=(
      jax.jit(
        prepare,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings),
        out_shardings=state_shardings,
        donate_argnums=(0,),
      )
      if tasks_lib.overrides(task, "prepare")
      else None
    ),
    with_params=jax.jit(
      with_params,
      in_shardings=(state_shardings, param_shardings),
      out_shardings=state_shardings,
      donate_argnums=(0,),
    ),
    train_step=jax.jit(
      train_step,
      in_shardings=(state_shardings, frozen_shardings, batch_shardings),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
    ),
    eval_step=jax.jit(
      task.evaluate,
      in_shardings=(param_shardings, frozen_shardings, batch_shardings, state_shardings.task_state),
      out_shardings=replicated,
    ),
  )


def compile_train_step(s: Setup):
  """Ahead-of-time compile of the train step for the setup's mesh (real or a TPU topology)."""
  with s.context():
    return s.train_step.lower(s.abstract_state, s.abstract_frozen, s.batch_spec).compile()


def memory_report(compiled) -> dict[str, int] | None:
  """Per-device bytes of a compiled executable, or None where the backend does not say."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not implemented on some backends)
    return None
  if stats is None:
    return None
  report = {
    k: int(getattr(stats, f"{k}_size_in_bytes", 0))
    for k in ("argument", "output", "alias", "temp", "generated_code")
  }
  report["total"] = (
    report["argument"]
    + report["output"]
    - report["alias"]
    + report["temp"]
    + report["generated_code"]
  )
  return report


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop polls at each step, which
  then saves and stops; a second Ctrl-C interrupts at once (the previous checkpoint is intact).
  In a multi-process run jax's coordination service catches SIGTERM and all processes agree on
  the step to stop at; SIGINT keeps Python's default there (one process cannot stop alone)."""

  def __init__(self):
    self.signal: signal.Signals | None = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      for signum in () if self._multi else (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)
    if signum == signal.SIGINT:  # the next Ctrl-C is Python's KeyboardInterrupt again
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def reached(self, step: int) -> bool:
    if self.signal is not None:
      return True
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signal = signal.SIGTERM
      return True
    return False

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _global_batch(local: dict[str, np.ndarray], spec: dict) -> dict[str, jax.Array]:
  return {
    k: jax.make_array_from_process_local_data(spec[k].sharding, local[k], spec[k].shape)
    for k in spec
  }


def _check_finite(step: int, metrics: dict[str, float], last_checkpoint: int | None):
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    where = (
      "no checkpoint was written"
      if last_checkpoint is None
      else f"the last good checkpoint (step {last_checkpoint}) is intact"
    )
    raise NonFiniteLossError(f"non-finite values at step {step}: {bad}; stopping; {where}")


def evaluate(
  s: Setup, params, frozen, eval_batches: list, task_state, eval_step=None
) -> dict[str, float]:
  """Mean eval metrics over ``eval_batches`` (``eval_step``: default the setup's, compiled for
  the training parameters' shardings)."""
  totals = {}
  for batch in eval_batches:
    for name, (total, count) in (eval_step or s.eval_step)(
      params, frozen, batch, task_state
    ).items():
      prev = totals.get(name, (0.0, 0.0))
      totals[name] = (prev[0] + total, prev[1] + count)
  totals = jax.device_get(totals)
  return {f"eval/{k}": float(t / max(c, 1e-9)) for k, (t, c) in totals.items()}


@dataclasses.dataclass
class Restored:
  """A trained run, loaded for evaluation (``restore``)."""

  setup: Setup
  params: Any
  frozen: Any
  task_state: Any
  step: int
  eval_batches: list

  def evaluate(self, params=None) -> dict[str, float]:
    """Eval metrics of ``params`` (default: the restored ones; any pytree the task's model
    accepts, e.g. quantized) over the run's eval batches."""
    # Any parameter pytree: shardings are inferred.
    eval_step = jax.jit(self.setup.task.evaluate)
    with self.setup.context():
      return evaluate(
        self.setup,
        self.params if params is None else params,
        self.frozen,
        self.eval_batches,
        self.task_state,
        eval_step=eval_step,
      )


def restore(config, workdir: str) -> Restored:
  """The latest checkpoint of a run in ``workdir`` with its eval batches (for studies and
  evaluation scripts). Raises ``ValueError`` if there is no checkpoint."""
  s = setup(config)
  train_data, eval_data = s.datasets()
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), max_to_keep=config.max_to_keep
  )
  try:
    state, step = ckpt.restore_latest(s.abstract_state, pipeline.train_iterator(train_data))
  finally:
    ckpt.close()
  if state is None:
    raise ValueError(f"no checkpoint in {workdir}")
  return Restored(
    setup=s,
    params=state.params,
    frozen=s.frozen(),
    task_state=state.task_state,
    step=step,
    eval_batches=[_global_batch(b, s.batch_spec) for b in eval_data],
  )


def _check_hf_init(s: Setup, folder: str) -> None:
  """``config.init_from`` is a Hugging Face folder: the task must train a transformer's own
  parameters, and the folder's config.json must describe ``config.model``."""
  model = s.task.model
  if not isinstance(model, transformer.Transformer) or jax.tree.structure(
    s.abstract_state.params
  ) != jax.tree.structure(tasks_lib.abstract_params(model)):
    raise ValueError(
      f"config.init_from={folder!r} is a Hugging Face folder: it can initialize a task whose "
      f"trainable parameters are a transformer's (task {s.config.task!r} trains others)"
    )
  hf.check_matches(folder, model.config, "config.init_from")


def _init_params(s: Setup, path: str):
  """(params, where they came from) for ``config.init_from``: a run's latest checkpoint or a
  Hugging Face folder, placed in the training parameters' shardings."""
  return tasks_lib.load_params(path, s.task.model, s.abstract_state.params, "config.init_from")


def train(config, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns the last logged train metrics and the final eval metrics (``eval/...``). Raises
  ``ValueError`` before compiling for a bad config, a workdir another run holds (its lock) or
  whose checkpoint belongs to a run of another config (``training/workdir.py``), and an
  ``init_from`` run whose parameters do not fit; ``NonFiniteLossError`` if training diverges;
  ``KeyboardInterrupt`` after saving a checkpoint on Ctrl-C (SIGINT).
  """
  s = setup(config)  # the config alone first: a bad one leaves no trace in the workdir
  lead = jax.process_index() == 0
  workdir_lib.prepare(workdir)
  with workdir_lib.Lock(workdir) if lead else contextlib.nullcontext():
    resuming = checkpoint_lib.has_checkpoint(workdir)
    # A task that reads init_from at every start (a frozen reference or base) needs it unchanged.
    fixed = ("init_from",) if "frozen" in s.task.init_from_sets else ()
    workdir_lib.check_resume(config, workdir, resuming, fixed=fixed)
    if config.get("init_from") and not resuming and "params" in s.task.init_from_sets:
      if hf.is_folder(config.init_from):
        _check_hf_init(s, config.init_from)
      else:
        checkpoint_lib.check_params_match(
          config.init_from, s.abstract_state.params, "config.init_from"
        )
    train_data, eval_data = s.datasets()
    with s.context():
      return _Loop(config, workdir, s, train_data, eval_data).run()


class _Loop:
  """The state of one ``train`` call: compiled step, checkpointer, writer, pending metrics."""

  def __init__(self, config, workdir, s: Setup, train_data, eval_data):
    self.config, self.s, self.task = config, s, s.task
    self.lead = jax.process_index() == 0
    self.train_iter = pipeline.train_iterator(train_data)
    self.ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), max_to_keep=config.max_to_keep
    )
    num_params = sum(x.size for x in jax.tree.leaves(s.abstract_state.params))
    self._print(
      f"task {config.task}: {type(self.task.model).__name__} with {num_params:,} "
      f"trainable params; mesh {dict(s.mesh.shape)} over "
      f"{s.mesh.devices.size} x {s.mesh.devices.flat[0].device_kind}"
    )
    # Restore first: a damaged checkpoint is skipped (or reported) before the long compile.
    self.state, self.step = self.ckpt.restore_latest(s.abstract_state, self.train_iter)
    self.frozen = s.frozen()
    if self.state is None:
      self.state, self.step = s.init(), 0
      if config.get("init_from") and "params" in s.task.init_from_sets:
        params, source = _init_params(s, config.init_from)
        self.state = s.with_params(self.state, params)
        self._print(f"initialized from {config.init_from} ({source})")
      if s.prepare is not None:  # data-dependent init from the first batch it will train on
        self.state = s.prepare(self.state, self.frozen, _global_batch(train_data[0], s.batch_spec))
    else:
      logging.info("resumed from %s at step %d", workdir, self.step)
      self._print(f"resumed from checkpoint at step {self.step}")
    if self.lead:  # only now: a rejected or failed resume leaves the stored config as it was
      workdir_lib.write_config(config, workdir)
    if config.optim.warmup_steps > (config.optim.decay_steps or config.steps):
      self._print(
        f"note: optim.warmup_steps={config.optim.warmup_steps} is longer than the schedule "
        f"({config.optim.decay_steps or config.steps} steps): the run ends during warmup"
      )
    t = time.perf_counter()
    self.compiled = compile_train_step(s)
    report = memory_report(self.compiled)
    self._print(
      f"compiled the train step in {time.perf_counter() - t:.1f} s"
      + (
        f"; per device: {report['total'] / 2**20:.1f} MiB (arguments "
        f"{report['argument'] / 2**20:.1f}, temporaries {report['temp'] / 2**20:.1f})"
        if report
        else ""
      )
    )
    self.eval_batches = [_global_batch(b, s.batch_spec) for b in eval_data]
    self.writer = metrics_lib.MetricsWriter(workdir, enabled=self.lead, start_step=self.step)
    self.flops_per_token = self.task.flops_per_token()
    self.peak, source = metrics_lib.peak_flops(
      s.mesh.devices.flat, getattr(self.task.model.config, "compute_dtype", jnp.float32)
    )
    self._print(f"MFU denominator: {self.peak:.3g} FLOP/s ({source})")
    self.last_checkpoint = self.ckpt.latest_step()
    self.summary: dict[str, float] = {}
    self.pending = None  # (step, device metrics) not fetched yet
    self.window = (time.perf_counter(), self.step)  # start of the current timing window
    self.first_step = self.step + 1

  def run(self) -> dict[str, float]:
    config = self.config
    preemption = _Preemption()
    try:
      while self.step < config.steps:
        if preemption.reached(self.step):
          self.save()
          self.ckpt.wait()
          message = f"saved checkpoint at step {self.step}"
          if preemption.signal == signal.SIGINT:
            raise KeyboardInterrupt(message)
          self._print(f"{preemption.signal.name}: {message}; exiting")
          return self.summary
        batch = _global_batch(next(self.train_iter), self.s.batch_spec)
        self.state, device_metrics = self.compiled(self.state, self.frozen, batch)
        self.finish_pending()  # step t's metrics, fetched after step t+1 was dispatched
        self.step += 1
        self.pending = (self.step, device_metrics)
        if config.eval_every and self.step % config.eval_every == 0:
          self.evaluate()
        if config.checkpoint_every and self.step % config.checkpoint_every == 0:
          self.save()
      self.save()
      if not (config.eval_every and self.step % config.eval_every == 0):
        self.evaluate()
      self.sample()
      return self.summary
    finally:
      preemption.close()
      self.ckpt.close()
      self.writer.close()

  def finish_pending(self):
    """Fetches the pending step's metrics, checks them, and logs them on schedule."""
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step, host, self.last_checkpoint)
    if step % self.config.log_every and step not in (self.config.steps, self.first_step):
      return  # log every log_every steps, the first step of a run and the last
    now = time.perf_counter()
    step_time = (now - self.window[0]) / max(step - self.window[1], 1)
    tokens_per_s = self.config.batch_size * self.config.seq_len / step_time
    mfu = self.flops_per_token * tokens_per_s / self.peak if self.flops_per_token else None
    host.update(tokens_per_s=tokens_per_s, step_time=step_time)
    if mfu is not None:
      host["mfu"] = mfu
    self.writer.write(step, host)
    self.summary.update(host)
    self._print(
      metrics_lib.progress_line(
        step, self.config.steps, host, tokens_per_s=tokens_per_s, step_time=step_time, mfu=mfu
      )
    )
    self.window = (time.perf_counter(), step)

  def save(self):
    self.finish_pending()  # never save a state whose step was not checked finite
    if self.ckpt.save(self.step, self.state, self.train_iter):
      self.last_checkpoint = self.step

  def evaluate(self):
    self.finish_pending()
    t = time.perf_counter()
    metrics = evaluate(
      self.s, self.state.params, self.frozen, self.eval_batches, self.state.task_state
    )
    self.writer.write(self.step, metrics)
    self.summary.update(metrics)
    self._print(
      f"eval at step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    self.window = (self.window[0] + time.perf_counter() - t, self.window[1])  # not train time

  def sample(self):
    config = self.config
    if not config.sample_tokens:
      return
    text = self.task.sample(
      self.state.params,
      config.sample_prompt,
      max_new_tokens=config.sample_tokens,
      temperature=config.sample_temperature,
      rng=jax.random.PRNGKey(config.seed),
      frozen=self.frozen,
    )
    if text is None:  # a task with nothing to say in text (needle, SAE)
      return
    self.writer.text("sample", self.step, text)
    self._print(f"--- sample at step {self.step} ---\n{text}\n---")

  def _print(self, line: str):
    if self.lead:
      print(line, flush=True)
