"""The CPU demo, end to end on real data: Fashion-MNIST -> tokenizer -> VIAR -> samples -> FID / sFID / P / R.

    bash scripts/demo.sh            # full demo (about 15 minutes on 2 CPU cores)
    bash scripts/demo.sh --quick    # smoke run with tiny sizes (under 2 minutes)

The code is pipelines/demo.py.
"""
from pipelines.demo import get_parser, main
from utils.cli import main_entry

if __name__ == '__main__':
    main_entry(main, get_parser())
