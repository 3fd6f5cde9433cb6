"""The downstream experiment (docs/downstream.md): does removing a knowledge-critical
subnetwork hurt a finetuned multiple-choice task exactly on the questions that need the removed
knowledge?

- :mod:`~kcs_lens.downstream.config`: :class:`DownstreamConfig`, every setting with its help and check;
- :mod:`~kcs_lens.downstream.tasks`: question files (CommonsenseQA's HF and original schemas,
  ``hf:`` datasets, the bundled task) and the facts they are linked to;
- :mod:`~kcs_lens.downstream.groups`: the groups ``removed`` / ``kept`` / ``unlinked``;
- :mod:`~kcs_lens.downstream.finetune`: ``head``, ``full`` and ``lm`` finetuning on the same batches;
- :mod:`~kcs_lens.downstream.stats`: the McNemar test (the bootstrap is :mod:`kcs_lens.stats`);
- :mod:`~kcs_lens.downstream.summary`: one run's result (accuracies, differences, the headline);
- :mod:`~kcs_lens.downstream.experiment`: :func:`downstream`, the whole comparison and its files.
"""

from kcs_lens.downstream.config import DownstreamConfig
from kcs_lens.downstream.experiment import downstream
from kcs_lens.downstream.finetune import FinetuneSettings
from kcs_lens.downstream.tasks import Question, load_questions

__all__ = ["downstream", "DownstreamConfig", "FinetuneSettings", "Question", "load_questions"]
