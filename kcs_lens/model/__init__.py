"""The model: canonical matrix names, per-family facts, the two TransformerLens backends
(:class:`~kcs_lens.model.lens.LensModel`) and loading a model spec."""
