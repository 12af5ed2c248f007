"""pMF at ImageNet scale: the authors' ViT, their released loss and recipe, the sampler and the evaluator.

Every equation comes from ``pmf_ref``; this package adds what scales. A map, in the order a newcomer
meets it:

One training batch, from ``train.py`` to ``loss.backward()``: eight places -- seven files of ``full/`` and
the core ``pmf_ref`` (entered as one namespace, ``P.<equation>``; its modules are path (the path, the times, the guidance draws) and
meanflow (the identity, the guidance equations, the losses)). Control leaves ``step.py`` only for a ``pmf_ref`` equation, a network pass through the
adapter, or the perceptual nets; the core calls back into ``full`` only through the function its JVP
differentiates (the adapter's ``u_and_trunk``, run by ``fast_jvp.jvp``).

1. ``train.py``      -- ``train(TrainConfig)``: the loop. ``step = TrainingStep.from_preset(model, preset)``;
                        per batch ``step.draw_randomness(x, ...)``, ``step(x, y, randomness)["loss"].backward()``,
                        optimiser, EMAs, checkpoint (``python -m full.train``)
2. ``data.py``       -- the ImageNet-style folder (ADM centre crop) or synthetic data; the batch (x, y)
3. ``step.py``       -- ``TrainingStep``: ``draw_randomness`` ((r, t), omega, interval, label drop: ``pmf_ref``
                        samplers; crop boxes; noise), then ``forward``, top to bottom: z_t and v_t, the guidance
                        pass, the guided target, one JVP (``P.average_velocity_jvp(..., jvp=fast_jvp.jvp)``), the
                        v-head on the JVP's tangent-free auxiliary output, the losses, the perceptual terms
4. ``pmf_ref``       -- every equation: ``P.interpolate``, ``P.target_velocity``, ``P.guided_velocity``,
                        ``P.average_velocity_jvp``, ``P.compound_velocity``, ``P.adaptively_weighted``, ...
5. ``model.py``      -- ``core_fns(model, cond)``: the one adapter from a ``PMFViT`` to the core's velocity
                        callables (x or u prediction is decided there); the ``PMFViT`` (trunk, u-head, v-head)
                        and its layers (blocks, attention, RoPE, the bottleneck patch embedding), written with
                        the ops of
6. ``fast_jvp.py``   -- ops whose forward-mode tangent costs what it should, and the JVP engine ``jvp``
7. ``perceptual.py`` -- crop boxes (drawn in step 3), LPIPS and ConvNeXt distances (perceptual runs only);
                        the gating and weighting are ``pmf_ref.perceptual_term``

Around it:

* ``presets.py``  -- ``ARCHITECTURES``, ``RECIPES``, ``SAMPLING``: three typed tables keyed by preset name
* ``optim.py``    -- Muon for matrices + Nesterov Adam for the rest;  ``ema.py`` -- EDM-style EMAs
* ``checkpoint.py`` -- atomic, weights-only checkpoints, resume, signals; ``io.py`` -- the one atomic writer
* ``distributed.py`` -- DDP set-up; ``fsdp.py`` -- FSDP2 sharding for pMF-H (``--fsdp``, ``python -m full.fsdp``)
* ``monitor.py``, ``plot.py`` -- sample grids, FID while training, TensorBoard; curves (``python -m full.plot``)
* ``sample.py``   -- ``generate(model, e, y, ...)``, the one 1-NFE sampler (the monitor and digits use it);
  sampling to PNG / npz (``python -m full.sample``)
* ``fid.py``, ``evaluate.py``, ``guidance_search.py`` -- FID / IS, reference statistics, the omega x
  interval x EMA search (``python -m full.evaluate``, ``python -m full.guidance_search``)
* ``official.py`` -- the authors' released checkpoints: key table, loader, writer; ``export.py`` --
  inference weights as safetensors or the authors' layout (``python -m full.export``)
* ``params.py``   -- parameter and GMAC counts (``python -m full.params``)
* ``cli.py``      -- the command-line convention every entry point follows

Subpackages: ``digits/`` -- the paper's ablations on 8x8 digits on a CPU (``python -m full.digits``);
``bench/`` -- the performance benchmarks (``python -m full.bench``, ``python -m full.bench.compile``), the
only part of ``full`` that imports ``toy``.
"""
from .cli import quiet_interrupt

quiet_interrupt()   # under `python -m full.<tool>` only: Ctrl-C is one line and exit 130, even during imports
