"""Benchmarks of pMF's cost. Measurements, never tests: nothing here asserts a time.

* ``python -m full.bench`` (``harness``) -- the JVP, training steps vs flow matching, sampling, memory;
  the reference and the trainers' JVP engines (``full.fast_jvp.ENGINE_DESCRIPTIONS``) interleaved
* ``python -m full.bench.compile`` (``compile``) -- eager vs ``torch.compile`` training step, and its break-even
* ``nets``   -- the benchmarked networks (toy MLP from ``toy``, the tiny and a small ViT)
* ``steps``  -- the timed steps (forward, JVP, flow matching, Alg. 1, released) on either path
* ``timing`` -- the interleaved timer, the clocks and the peak-memory probe
"""
from .harness import BenchConfig, main, run

__all__ = ["BenchConfig", "main", "run"]
