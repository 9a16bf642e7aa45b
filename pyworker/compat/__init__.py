"""Other PyWorker APIs on pyworker, so an existing worker runs with its import line changed.

`pyworker.compat.vastai` is the reference SDK's (`vastai` 1.9.1) configuration API.
"""
