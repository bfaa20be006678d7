"""The flaxseed model zoo.

    from flaxseed import models
    models.list()                          # names of every registered preset
    model = models.get("transformer-tiny")  # the Linen module, its config bound as ``.config``
    params = model.init(rng, tokens)["params"]
    out = models.generate(model, params, prompts, max_new_tokens=32)  # models/sampling.py

Each model family registers its presets here (``register``) and its module/config classes
(``register_family``), which is how the trainer turns ``config.model`` into a module.
"""

import builtins
import dataclasses
from typing import Any, Callable

from flaxseed.models import diffusion_lm
from flaxseed.models import sae
from flaxseed.models import titans
from flaxseed.models import transformer
from flaxseed.models.sampling import generate  # noqa: F401  (the zoo's generation entry point)

_PRESETS: dict[str, tuple[type, Callable[..., Any]]] = {}
_FAMILIES: dict[str, tuple[type, type]] = {}


def register(name: str, module_cls: type, config_fn: Callable[..., Any]) -> None:
  """Registers preset ``name``: ``get(name)`` returns ``module_cls(config_fn())``."""
  if name in _PRESETS:
    raise ValueError(f"model preset {name!r} is already registered")
  _PRESETS[name] = (module_cls, config_fn)


def register_family(family: str, module_cls: type, config_cls: type) -> None:
  """Registers a family: ``build(family, fields)`` returns ``module_cls(config_cls(**fields))``."""
  _FAMILIES[family] = (module_cls, config_cls)


def list() -> builtins.list[str]:  # noqa: A001 (the zoo's public name)
  """Names of all registered presets, sorted."""
  return sorted(_PRESETS)


def get(name: str, **overrides):
  """The Linen module of preset ``name``; ``overrides`` replace config fields."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list())}")
  module_cls, config_fn = _PRESETS[name]
  return module_cls(config_fn(**overrides))


def families() -> builtins.list[str]:
  return sorted(_FAMILIES)


def config_class(family: str) -> type:
  if family not in _FAMILIES:
    raise ValueError(f"unknown model family {family!r}; available: {', '.join(families())}")
  return _FAMILIES[family][1]


def build(family: str, fields: dict[str, Any]):
  """``module_cls(config_cls(**fields))`` with errors that name the offending field."""
  config_cls = config_class(family)
  module_cls = _FAMILIES[family][0]
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"unknown {config_cls.__name__} field(s) {unknown}; known: {sorted(known)}")
  return module_cls(config_cls(**fields))


for _family, _module_cls, _config_cls, _presets in (
  ("transformer", transformer.Transformer, transformer.TransformerConfig, transformer.PRESETS),
  ("titans", titans.Titans, titans.TitansConfig, titans.PRESETS),
  ("diffusion_lm", diffusion_lm.DiffusionLM, diffusion_lm.DiffusionLMConfig, diffusion_lm.PRESETS),
  ("sae", sae.SAE, sae.SAEConfig, sae.PRESETS),
):
  register_family(_family, _module_cls, _config_cls)
  for _name, _fn in _presets.items():
    register(_name, _module_cls, _fn)
