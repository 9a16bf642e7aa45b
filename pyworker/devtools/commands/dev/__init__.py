"""`pyworker dev`: the command's arguments (`command`), what it will start (`plan`), the
session that starts it in order (`session`), waiting for the worker to be ready (`ready`), what
it prints (`output`), and the state file `call` and `load` read (`state`)."""
