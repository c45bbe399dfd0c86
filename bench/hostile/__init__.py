"""The hostile-client run of the gateway (`bench chaos --gateway`): bench/hostile/run.py."""
