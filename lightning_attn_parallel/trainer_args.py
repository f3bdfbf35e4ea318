"""Every argument `lightning.Trainer` takes, read without importing Lightning.

The `trainer` config group accepts each of them (config.py), so Lightning's own advice
(`trainer.check_val_every_n_epoch=null`, `trainer.limit_train_batches=...`) can be followed from
the command line, and a misspelt one is still refused when Hydra composes. Importing Lightning
takes seconds, longer than a refused command may take, so the names and literal defaults come
from the source of `Trainer.__init__` (parsed with `ast`); tests compare them with
`inspect.signature(lightning.Trainer.__init__)`. Where the source cannot be found or parsed, the
signature itself is read (slower, same answer).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
from pathlib import Path
from typing import Any

# Set by train.py from its own config groups (strategy=, logger=, callbacks=, run_dir): not trainer keys.
SET_BY_THE_PROJECT = {"strategy": "strategy=NAME (conf/strategy)", "logger": "logger=NAME (conf/logger)",
                      "callbacks": "callbacks=NAME (conf/callbacks)", "default_root_dir": "run_dir=PATH"}
# A default that is not a literal (none today): the key is left out unless the user sets it.
NOT_A_LITERAL = object()


def _from_source() -> dict[str, Any]:
    spec = importlib.util.find_spec("lightning")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("lightning")
    source = Path(list(spec.submodule_search_locations)[0]) / "pytorch" / "trainer" / "trainer.py"
    tree = ast.parse(source.read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    init = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args
    named = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults)) + [
        (a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]

    def literal(node: ast.expr) -> Any:
        try:
            return ast.literal_eval(node)
        except ValueError:
            return NOT_A_LITERAL

    return {a.arg: literal(d) for a, d in named if a.arg != "self"}


def _from_signature() -> dict[str, Any]:
    import lightning

    parameters = inspect.signature(lightning.Trainer.__init__).parameters
    return {n: p.default for n, p in parameters.items()
            if n != "self" and p.default is not inspect.Parameter.empty}


@functools.lru_cache(maxsize=1)
def trainer_parameters() -> dict[str, Any]:
    """Name -> default of every keyword argument of `lightning.Trainer` (NOT_A_LITERAL where the
    default is not a literal)."""
    try:
        return _from_source()
    except (OSError, SyntaxError, StopIteration, FileNotFoundError):
        return _from_signature()


__all__ = ["trainer_parameters", "SET_BY_THE_PROJECT", "NOT_A_LITERAL"]
