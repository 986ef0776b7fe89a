"""`python -m distconvnet torchrun ...`: torchrun's node agent (the same arguments, the same
work), whose failures read as one line each, as the trainer's do. The launch scripts run it.

torchrun itself ends a failed rendezvous with a traceback and a bare exception name (a node on
another port, a MASTER_ADDR nobody serves), and a failed worker with a page-wide report under
a traceback; the worker has already said why in its own line."""

from .launch import DistributedError


class RendezvousFailed(DistributedError):
    """The nodes of a job could not meet."""


class WorkersFailed(DistributedError):
    """A worker of this node failed and no restart was left."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def torchrun_command(argv):
    from torch.distributed import DistError, run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError,
                                                          RendezvousConnectionError,
                                                          RendezvousError,
                                                          RendezvousTimeoutError)
    args = run.parse_args(argv)
    where = "on this machine" if args.standalone else \
        f"'{args.rdzv_id}' at {args.rdzv_endpoint or f'{args.master_addr}:{args.master_port}'}"
    try:
        run.run(args)
    except RendezvousTimeoutError:
        raise RendezvousFailed(
            f"the rendezvous {where} timed out ({_join_timeout(args)}) before "
            f"{args.nnodes} node(s) joined: every node must be given the same MASTER_ADDR, "
            f"MASTER_PORT and RDZV_ID, and reach MASTER_ADDR:MASTER_PORT") from None
    except RendezvousClosedError:
        raise RendezvousFailed(f"the rendezvous {where} is closed: its job has ended, or ended "
                               f"its workers after a failure with no restart left") from None
    except RendezvousConnectionError as e:
        raise RendezvousFailed(f"no connection to the rendezvous {where}, which the agent of "
                               f"the node at MASTER_ADDR serves ({_first_line(e.__cause__ or e)})"
                               ) from None
    except (RendezvousError, DistError) as e:
        raise RendezvousFailed(f"the rendezvous {where} failed: {_first_line(e)}") from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            what, code = f"was killed by {failure.signal_name()}", 128 - failure.exitcode
        else:
            what, code = f"exited with status {failure.exitcode}", failure.exitcode
        others = len(e.failures) - 1
        raise WorkersFailed(f"worker rank {rank} {what}"
                            f"{f' (and {others} more of this node)' if others else ''} and no "
                            f"restart is left (MAX_RESTARTS); that worker's messages say why",
                            code) from None
    return 0


def _join_timeout(args):
    """How long the rendezvous waited: the last join_timeout of --rdzv-conf wins, as in torch."""
    seconds = None
    for entry in (args.rdzv_conf or "").split(","):
        key, _, value = entry.partition("=")
        if key.strip() == "join_timeout":
            seconds = value.strip()
    return f"join_timeout={seconds} s" if seconds else "torchrun's join_timeout"


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
