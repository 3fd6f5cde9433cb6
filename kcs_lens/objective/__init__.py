"""The discovery loss (Bayazit et al., EMNLP 2024): the reference objective and the fast one with the
same losses and gradients."""
