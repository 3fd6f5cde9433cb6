"""Masks over the model's weights (granularities, the straight-through sample, attaching them with
``parametrize``) and the saved :class:`~kcs_lens.masks.subnetwork.Subnetwork`."""
