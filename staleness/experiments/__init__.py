"""Staleness experiments: `async-rl sweep` and its report, the throughput simulator and its calibration
from measured runs. They drive whole runs; nothing in the running system imports them."""
