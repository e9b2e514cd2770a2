"""dd: Distilled Decoding for image autoregressive models.

Layers (dependencies point down only):
  1. core, pure torch: ``dd.models``, ``dd.flow``, ``dd.sampling``, ``dd.pairs``, ``dd.metrics``,
     ``dd.checkpoint``, ``dd.data``;
  2. Lightning tasks: ``dd.tasks``;
  3. Hydra entry points: ``dd.generate_pairs``, ``dd.train``, ``dd.eval``.
"""

__version__ = "0.1.0"
