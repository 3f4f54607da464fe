"""Makes plain ``lm_eval --model pretrain ...`` work.

lm-eval 0.4.13 finds models only in its own registry (no entry-point discovery). ``python -m
evals.lm_eval_plugin install`` therefore writes a one-line ``.pth`` file into site-packages that imports this
module when Python starts (the Makefile does this after installing the package). It only adds an import
hook: when lm-eval's registry module is first imported, ``pretrain`` is registered there as a lazy
``module:Class`` placeholder, so no other program imports lm-eval or torch because of it.

    python -m pretrain.evals.lm_eval_plugin install     # writes site-packages/pretrain_lm_eval.pth
    python -m pretrain.evals.lm_eval_plugin uninstall
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

REGISTRY_MODULE = "lm_eval.api.registry"
NAME, TARGET = "pretrain", "pretrain.evals.lm_eval_plugin:PretrainLM"
PTH = "pretrain_lm_eval.pth"  # sorts after setuptools' __editable__*.pth, which puts `evals` on the path


def register(registry) -> None:
    """Add ``pretrain`` to lm-eval's model registry (after lm-eval's own models: ``get_model`` fills an empty
    registry with them, a non-empty one it leaves alone)."""
    import lm_eval.models  # noqa: F401

    if NAME not in registry.model_registry:
        registry.model_registry.register(NAME, target=TARGET)


class _RegistryHook:
    """A ``sys.meta_path`` finder (not derived from ``importlib.abc``: that import alone costs ~10 ms at every
    interpreter start) for lm-eval's registry module only."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            register(module)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryHook())


def pth_path() -> str:
    import sysconfig

    return os.path.join(sysconfig.get_paths()["purelib"], PTH)


def write_pth() -> str:
    path = pth_path()
    with open(path + ".tmp", "w") as f:
        f.write("import pretrain.evals.lm_eval_hook\n")
    os.replace(path + ".tmp", path)
    return path


def remove_pth() -> str:
    if os.path.exists(pth_path()):
        os.remove(pth_path())
    return pth_path()


install()
