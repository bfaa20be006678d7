"""The train step: a pure function ``(state, frozen, batch) -> (state, metrics)``.

Gradient accumulation runs inside the step: the batch is split into ``accum_steps`` micro-batches
(row ``i`` goes to micro-batch ``i % accum_steps``, so every device contributes equally to each)
and a ``lax.scan`` sums their gradients. The loss is the mean of the micro-batch losses.

A task with per-step statistics (``task_state``, e.g. an SAE's dead-latent counters) defines
``stateful_loss(params, frozen, batch, rng, task_state) -> (loss, (metrics, task_state))``; the
statistics pass through the micro-batches in order. Other tasks define ``loss`` only.
"""

import jax
import jax.numpy as jnp
import optax

from flaxseed.models import sharding as sh
from flaxseed.training.state import TrainState


def _split_microbatches(batch, accum_steps: int):
  def split(x):
    x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)  # [accum, B / accum, ...], rows strided across devices
  return jax.tree.map(split, batch)


def stateful_loss(task):
  """``task``'s loss in the stateful form (a stateless task's state passes through)."""
  if hasattr(task, "stateful_loss"):
    return task.stateful_loss

  def loss(params, frozen, batch, rng, task_state):
    value, metrics = task.loss(params, frozen, batch, rng)
    return value, (metrics, task_state)
  return loss


def make_train_step(task, optimizer: optax.GradientTransformation, schedule, *,
                    accum_steps: int = 1):
  """The step function for ``task``; jit it with shardings and ``donate_argnums=(0,)``."""
  grad_fn = jax.value_and_grad(stateful_loss(task), has_aux=True)

  def train_step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, (metrics, task_state)), grads = grad_fn(state.params, frozen, batch, rng,
                                                     state.task_state)
    else:
      def micro_step(carry, xs):
        sums, task_state = carry
        micro_batch, i = xs
        micro_batch = jax.tree.map(lambda x: sh.constrain(x, (sh.BATCH,) + (None,) * (x.ndim - 1)),
                                   micro_batch)
        (loss, (metrics, task_state)), grads = grad_fn(
            state.params, frozen, micro_batch, jax.random.fold_in(rng, i), task_state)
        return (jax.tree.map(jnp.add, sums, ((loss, metrics), grads)), task_state), None

      micro = jax.tree.map(lambda x: x[0], _split_microbatches(batch, accum_steps))
      (loss_shape, (metrics_shape, _)), grads_shape = jax.eval_shape(
          grad_fn, state.params, frozen, micro, rng, state.task_state)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           ((loss_shape, metrics_shape), grads_shape))
      (sums, task_state), _ = jax.lax.scan(
          micro_step, (zeros, state.task_state),
          (_split_microbatches(batch, accum_steps), jnp.arange(accum_steps)))
      (loss, metrics), grads = jax.tree.map(lambda x: x / accum_steps, sums)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "objective": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         task_state=task_state), metrics

  return train_step


def make_eval_step(task):
  """``(params, frozen, batch, task_state) -> {name: (sum, count)}``; a task with ``init_state``
  also gets its ``task_state`` (e.g. an SAE's inference threshold)."""
  def eval_step(params, frozen, batch, task_state):
    if hasattr(task, "init_state"):
      return task.evaluate(params, frozen, batch, task_state)
    return task.evaluate(params, frozen, batch)
  return eval_step
