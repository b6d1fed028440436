"""``python -m fairgen.main`` with a record of what this process read and wrote (tests only).

tests/test_multiprocess.py starts it with tools/launch_local.py in place of
``python -m fairgen.main``; the arguments are fairgen.main's. With ``FAIRGEN_TEST_RECORD=DIR``
the process writes ``DIR/process_<index>.json`` at exit:

- ``reads``: the row indices of every ``get`` on the training split (the loader's reads);
- ``writes``: every file it opened for writing from Python (Python's ``open`` audit event:
  logs, TensorBoard events, sample grids, eval JSON, density-ratio weights; Orbax writes
  checkpoint data from C++, which this does not see).

With ``FAIRGEN_TEST_FAIL=PROCESS:STEP:HOW`` process PROCESS sends itself a signal once the
training loop has dispatched STEP (``fairgen.peers.note_step``), as a host dies or hangs
there: HOW is ``kill`` (SIGKILL), ``stop`` (SIGSTOP: a hung host) or ``save`` (SIGKILL just
after the checkpoint save of STEP started, its writes in flight). Just before, it writes the
time (``time.time()``) to ``FAIRGEN_TEST_FAIL_MARK``, the file named there.
"""

import atexit
import json
import os
import runpy
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = os.environ.get("FAIRGEN_TEST_RECORD")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
reads, writes = [], []


def _audit(event, args):
  if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
    return
  path, mode, flags = args
  writing = any(c in mode for c in "wax+") if mode is not None else bool(flags & WRITE_FLAGS)
  path = os.path.abspath(os.fsdecode(path))
  if writing and not path.startswith(os.path.abspath(RECORD) + os.sep):
    writes.append(path)


def _record_training_reads():
  from fairgen import data
  load = data.load

  def recording_load(data_config, split, *args, **kwargs):
    source = load(data_config, split, *args, **kwargs)
    if split == data_config["split"]:
      get = source.get

      def recording_get(indices):
        reads.append([int(i) for i in indices])
        return get(indices)

      source.get = recording_get
    return source

  data.load = recording_load


def _signal_self(sig):
  with open(os.environ["FAIRGEN_TEST_FAIL_MARK"], "w") as f:
    f.write(repr(time.time()))
  os.kill(os.getpid(), sig)


def _fail_at_step(spec):
  import jax
  from fairgen import checkpoint, peers
  process, step, how = spec.split(":")
  process, step = int(process), int(step)
  if how == "save":
    save = checkpoint.Checkpointer.save

    def save_then_die(self, at, state, force=False):
      saved = save(self, at, state, force)
      if jax.process_index() == process and at == step:
        _signal_self(signal.SIGKILL)
      return saved

    checkpoint.Checkpointer.save = save_then_die
    return
  note_step = peers.note_step

  def note_then_fail(at):
    note_step(at)
    if jax.process_index() == process and at >= step:
      _signal_self(signal.SIGSTOP if how == "stop" else signal.SIGKILL)

  peers.note_step = note_then_fail


def _save():
  import jax
  with open(os.path.join(RECORD, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump({"reads": reads, "writes": writes, "process_count": jax.process_count()}, f)


if RECORD:
  _record_training_reads()
  sys.addaudithook(_audit)
  atexit.register(_save)
if os.environ.get("FAIRGEN_TEST_FAIL"):
  _fail_at_step(os.environ["FAIRGEN_TEST_FAIL"])
sys.argv[0] = "fairgen.main"
runpy.run_module("fairgen.main", run_name="__main__", alter_sys=True)
