"""The train step: a pure function ``(state, frozen, batch) -> (state, metrics)``.

Gradient accumulation runs inside the step: the batch is split into ``accum_steps`` micro-batches
(row ``i`` goes to micro-batch ``i % accum_steps``, so every device contributes equally to each)
and a ``lax.scan`` sums their gradients. The loss is the mean of the micro-batch losses.

The step differentiates the task's ``stateful_loss(params, frozen, batch, rng, task_state) ->
(loss, (metrics, task_state))`` (``training/tasks/base.py``: a task with per-step statistics, e.g.
an SAE's dead-latent counters, defines it; for the others it wraps ``loss`` and passes the state
through). The statistics pass through the micro-batches in order.
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


def make_train_step(
  task, optimizer: optax.GradientTransformation, schedule, *, accum_steps: int = 1
):
  """The step function for ``task``; jit it with shardings and ``donate_argnums=(0,)``."""
  grad_fn = jax.value_and_grad(task.stateful_loss, has_aux=True)

  def train_step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, (metrics, task_state)), grads = grad_fn(
        state.params, frozen, batch, rng, state.task_state
      )
    else:

      def micro_step(carry, xs):
        sums, task_state = carry
        micro_batch, i = xs
        micro_batch = jax.tree.map(
          lambda x: sh.constrain(x, (sh.BATCH,) + (None,) * (x.ndim - 1)), micro_batch
        )
        (loss, (metrics, task_state)), grads = grad_fn(
          state.params, frozen, micro_batch, jax.random.fold_in(rng, i), task_state
        )
        return (jax.tree.map(jnp.add, sums, ((loss, metrics), grads)), task_state), None

      micro = jax.tree.map(lambda x: x[0], _split_microbatches(batch, accum_steps))
      (loss_shape, (metrics_shape, _)), grads_shape = jax.eval_shape(
        grad_fn, state.params, frozen, micro, rng, state.task_state
      )
      zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), ((loss_shape, metrics_shape), grads_shape)
      )
      (sums, task_state), _ = jax.lax.scan(
        micro_step,
        (zeros, state.task_state),
        (_split_microbatches(batch, accum_steps), jnp.arange(accum_steps)),
      )
      (loss, metrics), grads = jax.tree.map(lambda x: x / accum_steps, sums)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      **metrics,
      "objective": loss,
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
      "learning_rate": schedule(state.step),
    }
    return state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, task_state=task_state
    ), metrics

  return train_step
