"""Activation sites of zoo models: read (``capture``) or replace (``splice``) a submodule's output
without changing the model's forward (a Flax method interceptor does both).

A site is the path of a submodule, ``/``-separated as in the parameter tree, optionally ending in
an alias: for the transformer, the diffusion LM and Titans, ``layers_3/resid_post`` is the output
of block ``layers_3`` (the residual stream after it), ``layers_3/mlp_out`` the output of its MLP,
``layers_3/attn_out`` of its attention. Any other path (``layers_3/mlp/up``) names that
submodule's output. A tuple output (the blocks return ``(x, None)``) means its first element.

    acts = sites.capture(model, {"params": params}, tokens, "layers_2/resid_post")   # [B, L, D]
    logits = sites.splice(model, {"params": params}, tokens, "layers_2/resid_post",
                          lambda x: sae_reconstruction(x))

Models must unroll their layers (``scan_layers=False``, as the CPU presets do): a scanned stack
runs one traced block for all layers, so a single layer's output has no site of its own.
"""

import flax.linen as nn

ALIASES = {"resid_post": (), "mlp_out": ("mlp",), "attn_out": ("attn",)}


def resolve(site: str) -> tuple[str, ...]:
  """The submodule path of ``site`` (aliases expanded)."""
  parts = tuple(p for p in site.split("/") if p)
  if parts and parts[-1] in ALIASES:
    parts = parts[:-1] + ALIASES[parts[-1]]
  if not parts:
    raise ValueError(f"site {site!r} names no submodule")
  return parts


def check_unscanned(model, what: str) -> None:
  """A ``ValueError`` naming ``what`` if ``model`` scans its layers (no per-layer sites)."""
  if getattr(model.config, "scan_layers", False):
    raise ValueError(
      f"{what}: the model scans its layers (config.scan_layers=True); "
      "activation sites need scan_layers=False"
    )


class Interventions:
  """``with Interventions({site: fn, ...}) as record:`` replaces each site's activation ``x``
  with ``fn(x)`` in every ``apply`` of a zoo model inside the block (a prompt's forward and each
  decode step alike), and records each site's activations in ``record.hits[site]``. ``check()``
  raises a ``ValueError`` listing the sites the model has when one of ``sites`` was never
  reached (e.g. misspelled); call it after an ``apply``."""

  def __init__(self, sites: dict):
    self.fns = {resolve(site): fn for site, fn in sites.items()}
    self.names = {resolve(site): site for site in sites}
    self.hits = {site: [] for site in sites}
    self.seen = set()
    self._ctx = None

  def _interceptor(self, next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    if context.method_name != "__call__":
      return out
    here = tuple(context.module.path)
    self.seen.add("/".join(here))
    if here not in self.fns:
      return out
    first = out[0] if isinstance(out, tuple) else out
    self.hits[self.names[here]].append(first)
    new = self.fns[here](first)
    return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new

  def __enter__(self):
    self._ctx = nn.intercept_methods(self._interceptor)
    self._ctx.__enter__()
    return self

  def __exit__(self, *exc):
    return self._ctx.__exit__(*exc)

  def check(self) -> None:
    for path, site in self.names.items():
      if not self.hits[site]:
        raise ValueError(
          f"site {site!r} (path {'/'.join(path)!r}) is not a submodule this model "
          f"calls; sites: {sorted(s for s in self.seen if s)}"
        )


def run(model, variables, tokens, site: str, replace=lambda x: x, **kwargs):
  """``(output, activation)``: the model's output with ``replace(activation)`` in place of the
  activation at ``site``, and the activation itself (one forward for both)."""
  check_unscanned(model, f"site {site!r}")
  with Interventions({site: replace}) as record:
    logits = model.apply(variables, tokens, **kwargs)
  record.check()
  return logits, record.hits[site][0]


def capture(model, variables, tokens, site: str, **kwargs):
  """The activation at ``site`` for ``tokens`` (``kwargs`` go to the model's ``apply``)."""
  return run(model, variables, tokens, site, lambda x: x, **kwargs)[1]


def splice(model, variables, tokens, site: str, fn, **kwargs):
  """The model's output with ``fn(activation)`` in place of the activation at ``site``."""
  return run(model, variables, tokens, site, fn, **kwargs)[0]
