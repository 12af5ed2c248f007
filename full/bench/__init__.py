"""Benchmarks of pMF's cost. Measurements, never tests: nothing here asserts a time.

* ``python -m full.bench`` (``harness``) -- the JVP, training steps vs flow matching, sampling, memory;
  the reference and the trainers' JVP engines (``full.fast_jvp.ENGINE_DESCRIPTIONS``) interleaved; the released
  step per precision policy (``--sections precision``, ``--device cuda --preset pMF-B/16``) and what fits on a
  GPU (``--sections memory``)
* ``python -m full.bench.compile`` (``compile``) -- eager vs ``torch.compile`` training step, and its break-even
* ``python -m full.bench.precision`` (``precision``) -- u and du/dt of each precision policy against float64
* ``training`` -- the released step at a preset's shapes per precision: images/s, memory, FLOP utilisation
* ``memory``  -- per-image peak memory of every preset, and the micro-batch / ``--accum-steps`` that fit
* ``syncs``   -- the device-to-host sync counter (a ``TorchDispatchMode``)
* ``nets``   -- the benchmarked networks (toy MLP from ``toy``, the tiny and a small ViT)
* ``steps``  -- the timed steps (forward, JVP, flow matching, Alg. 1, released) on either path
* ``timing`` -- the interleaved timer, the clocks and the peak-memory probe
"""
from .harness import BenchConfig, main, run

__all__ = ["BenchConfig", "main", "run"]
