"""pMF at ImageNet scale: the authors' ViT, their released loss and recipe, the sampler and the evaluator.

Every equation comes from ``pmf_ref``; this package adds what scales. A map, in the order a newcomer
meets it:

One training batch, from ``train.py`` to ``loss.backward()`` (six files of ``full/`` plus ``pmf_ref``):

1. ``train.py``      -- ``train(TrainConfig)``: the loop; builds the step from the preset, calls it,
                        backward, optimiser, EMAs, checkpoint (``python -m full.train``)
2. ``data.py``       -- the ImageNet-style folder (ADM centre crop) or synthetic data; the batch (x, y)
3. ``step.py``       -- ``TrainingStep.from_preset``: ``draw_randomness`` ((r, t), omega, interval, label drop,
                        crops, noise), then ``forward``: the released loss top to bottom, every equation a
                        ``pmf_ref`` call, the JVP through the engine of ``fast_jvp.py``
4. ``model.py``      -- ``PMFViT`` (trunk, u-head, v-head; ``forward_uv``), ``x_hat_from_output`` (x or u
                        prediction, one owner), ``build_model(preset)``
5. ``layers.py``     -- blocks, attention, RoPE, the bottleneck patch embedding (cheap-JVP ops of
                        ``fast_jvp.py``, which also holds the JVP engine ``fast_jvp.jvp``)
6. ``perceptual.py`` -- LPIPS and ConvNeXt distances; the gating and weighting are ``pmf_ref.perceptual_term``

Around it:

* ``presets.py``  -- ``ARCHITECTURES``, ``RECIPES``, ``SAMPLING``: three typed tables keyed by preset name
* ``optim.py``    -- Muon for matrices + Nesterov Adam for the rest;  ``ema.py`` -- EDM-style EMAs
* ``checkpoint.py`` -- atomic, weights-only checkpoints, resume, signals; ``io.py`` -- the one atomic writer
* ``distributed.py`` -- DDP set-up; ``fsdp.py`` -- FSDP2 sharding for pMF-H (``--fsdp``, ``python -m full.fsdp``)
* ``monitor.py``, ``plot.py`` -- sample grids, FID while training, TensorBoard; curves (``python -m full.plot``)
* ``sample.py``   -- one-step sampling to PNG / npz (``python -m full.sample``)
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
