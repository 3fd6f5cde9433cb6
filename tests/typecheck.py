"""The runtime checker the test suite applies to every annotated function of kcs_lens (through
jaxtyping's import hook, pyproject.toml ``--jaxtyping-packages``): beartype with PEP 484's
numeric tower (an int is a valid float), checking jaxtyping shapes as well as types."""

from beartype import BeartypeConf, beartype

typecheck = beartype(conf=BeartypeConf(is_pep484_tower=True))
