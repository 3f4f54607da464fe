"""pretrain: distributed large-model pretraining (GPT, T5, Switch-MoE).

One import namespace: the repository's top-level folders ``data/``, ``parallel/``, ``launch/`` and ``evals/``
are the subpackages ``pretrain.data``, ``pretrain.parallel``, ``pretrain.launch`` and ``pretrain.evals``. An
installed wheel places them there (``pyproject.toml``, ``package-dir``); in a checkout (an editable install, or
Python started in the repository) the checkout root is added to this package's search path, so the same names
resolve to the same folders. A user's own ``data/`` or ``parallel/`` folder can never shadow them.
"""

import os as _os

__version__ = "0.1.0"

_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_checkout, "pyproject.toml")) and _os.path.isfile(
        _os.path.join(_checkout, "parallel", "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 (a package's __path__)
