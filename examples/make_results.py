"""Write docs/results.md: original vs RTN/GPTQ/AWQ (W4, W3 g128) and SmoothQuant/QuaRot/DuQuant
(W8A8, W4A4) on the shipped trained models (tiny-llada, tiny-dream), scored by held-out masked-token
NLL and the bundled multiple-choice task. Runs offline on a CPU (about half an hour on 2 cores).

    python examples/make_results.py
    python examples/make_results.py --methods rtn,gptq --families llada   # a subset

See ``qdlm_export/eval/results.py`` for the settings and ``--help`` for the options.
"""

import sys

from qdlm_export.eval.results import main

if __name__ == "__main__":
    sys.exit(main())
