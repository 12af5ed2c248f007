"""The digits benchmark: the paper's ablations on scikit-learn's 8x8 digits, upsampled, on a CPU.

``python -m full.digits --help``. It trains with the unchanged ImageNet trainer (``full.train``) and
only adds data, a scoring network and the experiments:

* ``data``        -- the digits split, upsampling to the run's resolution, the span of upsampled digits
* ``classifier``  -- the small CNN that scores samples (trained deterministically, cached)
* ``metrics``     -- ``DigitsEvaluator``: Fréchet distance of the CNN's features, class accuracy, off-span energy
* ``runs``        -- one arm: train, sample by class, score (cached under the output folder)
* ``experiments`` -- the arms of each experiment (a)-(e) and the paper's numbers beside them
* ``report``      -- the markdown table and the figure
* ``cli``         -- the command line
"""
