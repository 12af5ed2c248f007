"""pMF at ImageNet scale: the authors' ViT, their released loss and recipe, the sampler and the evaluator.

Every equation comes from ``pmf_ref``; this package adds what scales. A map, in the order a newcomer
meets it:

One training batch, from ``next(batches)`` to ``loss.backward()`` in ``train()``'s loop, enters eight files
(tests/test_full_train.py traces it and checks this list). ``train.py`` calls only into ``data.py`` and
``step.py``; control leaves ``step.py`` only for a ``pmf_ref`` equation, a network pass through the adapter,
or the perceptual nets; the core calls back into ``full`` only through the function its JVP differentiates
(the adapter's ``u_and_trunk``, run by the engine ``fast_jvp.jvp``). In the order the batch meets them:

1. ``full/train.py``       -- ``train(TrainConfig)``: the loop. Per batch: the batch, ``step.draw_randomness``,
                              then per micro-batch ``step_fn(x, y, randomness)["loss"].backward()`` (DDP's
                              ``no_sync`` on all but the last); after it the optimiser, EMAs, log, checkpoint
                              (``python -m full.train``)
2. ``full/data.py``        -- the ImageNet-style folder (ADM centre crop) or synthetic data; the batch (x, y)
3. ``full/step.py``        -- ``TrainingStep`` (built once by ``TrainingStep.from_preset(model, preset)``):
                              ``draw_randomness`` ((r, t), omega, interval, label drop, crop boxes, noise), then
                              ``forward``: ``loss_terms`` under the step's precision, top to bottom -- z_t and
                              v_t, the guidance pass, the guided target, one JVP, the v-head on the JVP's
                              tangent-free auxiliary output, the losses, the perceptual terms
4. ``pmf_ref/path.py``     -- the draws (``P.sample_time_pair_released``, ``P.sample_omega``,
                              ``P.sample_guidance_interval``, ``P.label_drop_mask_diagonal``) and the path
                              (``P.interpolate``, ``P.target_velocity``, ``P.denoised_image``)
5. ``full/perceptual.py``  -- the crop boxes (drawn in 3); LPIPS and ConvNeXt distances (perceptual runs only)
6. ``pmf_ref/meanflow.py`` -- the guidance equations (``P.guidance_scale_for_target``, ``P.guided_velocity``,
                              ``P.drop_labels``), the JVP (``P.average_velocity_jvp(..., jvp=fast_jvp.jvp)``),
                              ``P.compound_velocity``, ``P.squared_error``, ``P.adaptively_weighted``,
                              ``P.perceptual_term``
7. ``full/model.py``       -- ``core_fns(model, cond)``: the one adapter from a ``PMFViT`` to the core's
                              velocity callables (what the output means, x or u, is decided there); the
                              ``PMFViT`` (trunk, u-head, v-head) and its layers (blocks, attention, RoPE, the
                              bottleneck patch embedding)
8. ``full/fast_jvp.py``    -- the JVP engine ``jvp`` and the ops the layers are written with, whose
                              forward-mode tangent costs what it should

Around it:

* ``presets.py``  -- ``ARCHITECTURES``, ``RECIPES``, ``SAMPLING``: three typed tables keyed by preset name
* ``config.py``   -- ``TrainConfig``, its checks and the command line;  ``precision.py`` -- fp32 / tf32 / bf16
* ``optim.py``    -- Muon for matrices + Nesterov Adam for the rest;  ``ema.py`` -- EDM-style EMAs
* ``checkpoint.py`` -- atomic, weights-only checkpoints, resume, signals; ``io.py`` -- the one atomic writer
* ``distributed.py`` -- DDP set-up and wrapping; ``fsdp.py`` -- FSDP2 sharding for pMF-H (``--fsdp``, ``python -m full.fsdp``)
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
