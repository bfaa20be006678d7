"""The launchers' one error path: every config, flag or file problem is one line, exit 2.

``cli.run(main)`` replaces ``app.run(main)``. Flag parsing goes through ``parse_flags``, which
turns absl's and ml_collections' exceptions (a missing config file, an unknown variant, an unknown
``--config.<key>``, a value of the wrong type, an unknown flag) into ``error: ...`` on stderr and
exit code 2. An unknown key is named with its close matches, including keys of the same name in
another section (``--config.model.k`` -> ``sae.k``). ``config(flag)`` reads a config flag's value
the same way (ml_collections defers some load errors to that point), and ``main`` functions raise
``ValueError`` for everything else they reject, which ``run`` reports the same way.
"""

import difflib
import os
import sys

from absl import app
from absl import flags


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _keys(tree, prefix="") -> list[str]:
  out = []
  for key in tree.keys():
    value = tree[key]
    path = f"{prefix}{key}"
    out.append(path)
    if hasattr(value, "keys"):
      out += _keys(value, f"{path}.")
  return out


def _missing(config, dotted: str) -> str | None:
  """The first prefix of ``dotted`` that ``config`` lacks, or None if the key exists."""
  node = config
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    if not hasattr(node, "keys") or part not in node:
      return ".".join(parts[: i + 1])
    node = node[part]
  return None


def unknown_key_message(config, dotted: str) -> str | None:
  """``config has no key 'x' (did you mean ...)`` for an unknown dotted key, else None."""
  missing = _missing(config, dotted)
  if missing is None:
    return None
  keys = _keys(config)
  leaf = dotted.rsplit(".", 1)[-1]
  close = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]  # the same key in another section
  close += [k for k in difflib.get_close_matches(dotted, keys, n=3, cutoff=0.6) if k not in close]
  hint = f" (did you mean {', '.join(f'--config.{k}' for k in close[:4])}?)" if close else ""
  return f"--config.{dotted}: the config has no key {missing!r}{hint}"


def _config_files(argv) -> list[tuple[str, str]]:
  """``(flag, value)`` of every ``--<flag>=<file>[:variant]`` whose flag is a config-file flag."""
  out = []
  for arg in argv[1:]:
    name, eq, value = arg.lstrip("-").partition("=")
    if not (eq and arg.startswith("--") and "." not in name and name in flags.FLAGS):
      continue
    if type(flags.FLAGS[name]).__name__ == "_ConfigFlag":
      out.append((name, value))
  return out


def _overrides(argv) -> list[tuple[str, str]]:
  """``(flag, dotted key)`` of the ``--config.a.b=v`` (and ``--config.a.b v``) overrides."""
  out = []
  for arg in argv[1:]:
    name = arg.lstrip("-").partition("=")[0]
    if arg.startswith("--") and "." in name:
      out.append(tuple(name.split(".", 1)))
  return out


def _one_line(e: Exception) -> str:
  """The first line of an exception's message, plus its last where it embeds a traceback."""
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return lines[0]


def parse_flags(argv):
  """``flags.FLAGS(argv)`` with one-line errors (exit 2) instead of tracebacks."""
  files = dict(_config_files(argv))
  for name, value in files.items():
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      fail(f"--{name}: no such config file: {path}")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (absl and ml_collections raise many kinds)
    for flag, key in _overrides(argv):
      if flag not in files:
        continue
      try:  # the config as the file gives it, to name the unknown key and its close matches
        config = flags.FLAGS[flag].parser.parse(files[flag])
      except Exception:  # pylint: disable=broad-except  (the config itself failed to load)
        break
      if message := unknown_key_message(config, key):
        fail(message)
    fail(_one_line(e))


def config(flag):
  """The value of a ``DEFINE_config_file`` flag; a config that failed to load exits 2."""
  try:
    return flag.value
  except (OSError, ValueError, AttributeError, KeyError) as e:
    fail(f"--{flag.name}: {_one_line(e)}")


def run(main):
  """``app.run(main)`` with ``parse_flags``; a ``ValueError`` from ``main`` exits 2 with one
  line."""

  def guarded(argv):
    try:
      return main(argv)
    except ValueError as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse_flags)
