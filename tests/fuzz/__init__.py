"""Fuzz targets for every entry point that reads network bytes, inputs signed by a roster key.

See ``_targets`` for the entry points and ``_runner`` for how cases run (worker subprocesses:
an abort or a hang is reported with the case that caused it). Commands:

    python -m tests.fuzz --target all --cases 1000 --seed 1          # a short run
    python -m tests.fuzz --target all --cases 100000 --seed 1 \\
        --summary bench/results/fuzz.md                               # the long run
    python -m tests.fuzz --target heal-apply --seed 1 --replay 1234  # one case, verbosely
"""
