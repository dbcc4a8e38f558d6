"""The fresh process of `timing.time_in_fresh_process`: `python -m nvit_lightning.latency.worker < job.json`
(a module of its own, so that running it does not import `timing` twice)."""

from .timing import main

if __name__ == "__main__":
    main()
