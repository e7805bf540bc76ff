"""``qsmrim-review OUTPUT_DIR``: argparse, path checks, then serve until interrupted.

It prints one line on stdout, the URL with the access token, and logs on stderr. Exit codes as
``qsmrim``: 0 after an interrupt, 64 usage error, 66 input missing.
"""
from __future__ import annotations

import argparse
import getpass
import logging
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..cli.common import (EXIT_INPUT_MISSING, EXIT_USAGE, ArgumentParser, HelpFormatter, container_name,
                          int_in_range)
from ..config import ReviewConfig

LOGGER = logging.getLogger("qsmrim.review")
_RATER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _rater(value: str) -> str:
    if not _RATER_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r}: a rater name is letters, digits, '.', '_' or '-' "
                                         "(at most 64, starting with a letter or digit)")
    return value


_port = int_in_range(0, 65535, "a port number", " (0: a free port)")


def _default_rater() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "rater"
    return name if _RATER_RE.match(name) else "rater"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="qsmrim-review", formatter_class=HelpFormatter,
                     description="Review qsmrim's rim+ candidates in the browser and save the decisions as a "
                                 "BIDS derivatives dataset (desc-rim_dseg + a decisions table) for "
                                 "`qsmrim ... participant --rim-annotations` and `group --train`.")
    parser.add_argument("output_dir", type=Path, help="a qsmrim participant-level output directory")
    parser.add_argument("--review-dir", "--review_dir", dest="review_dir", type=Path, default=None,
                        help="where the annotations go (default: <output_dir>-review beside it, or beside "
                             "the input dataset when output_dir is inside it; never inside the input dataset)")
    parser.add_argument("--rater", type=_rater, default=_default_rater(),
                        help="your name in the decisions table; raters' rows are kept apart")
    parser.add_argument("--bids-dir", "--bids_dir", dest="bids_dir", type=Path, default=None,
                        help="the raw dataset the outputs came from (its QSM maps are shown); default: the "
                             "one recorded in output_dir/dataset_description.json")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory whose thresholds order the queue; default: the model "
                             "recorded in the outputs")
    parser.add_argument("--operating-point", "--operating_point", dest="operating_point",
                        choices=["high-sensitivity", "f1"], default="high-sensitivity",
                        help="lesions at or above this threshold of the model form the review set, "
                             "shown first")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (keep 127.0.0.1 unless you tunnel to it)")
    parser.add_argument("--port", type=_port, default=0, help="port to listen on; 0: a free one")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log every request (-v)")
    parser.add_argument("--version", action="version", version=f"qsmrim-review {__version__}")
    return parser


class UsageError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def build_config(args: argparse.Namespace) -> ReviewConfig:
    """The one ReviewConfig, refusing layouts that would write into the input dataset or the outputs."""
    from .catalog import default_review_dir, raw_dataset_of

    output_dir = args.output_dir.expanduser().resolve()
    if not output_dir.is_dir():
        raise UsageError(f"output_dir {args.output_dir} does not exist; give a qsmrim participant-level "
                         "output directory", EXIT_INPUT_MISSING)
    bids_dir = args.bids_dir.expanduser().resolve() if args.bids_dir else raw_dataset_of(output_dir)
    if args.bids_dir is not None and not bids_dir.is_dir():
        raise UsageError(f"--bids-dir {args.bids_dir} does not exist", EXIT_INPUT_MISSING)
    review_dir = (args.review_dir.expanduser().resolve() if args.review_dir
                  else default_review_dir(output_dir, bids_dir))
    if bids_dir is not None and (_within(review_dir, bids_dir) or _within(bids_dir, review_dir)):
        raise UsageError(f"review dir {review_dir} would be inside (or hold) the input dataset {bids_dir}; "
                         "give --review-dir a folder outside it")
    if _within(review_dir, output_dir) or _within(output_dir, review_dir):
        raise UsageError(f"review dir {review_dir} would be inside (or hold) the outputs {output_dir}; "
                         "give --review-dir a folder of its own, e.g. beside it")
    model_dir = None
    if args.model is not None:
        model_dir = args.model.expanduser().resolve()
        if not (model_dir / "model.json").is_file():
            raise UsageError(f"--model {args.model} holds no model.json", EXIT_INPUT_MISSING)
    return ReviewConfig(output_dir=output_dir, review_dir=review_dir, bids_dir=bids_dir, model_dir=model_dir,
                        operating_point=args.operating_point, rater=args.rater, host=args.host, port=args.port,
                        container=container_name())


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(logging.DEBUG if verbosity else logging.INFO)
    LOGGER.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``qsmrim-review``, ``python -m qsmrim_app.review``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    _setup_logging(args.verbose)
    from .catalog import CatalogError, build_catalog
    from .server import ReviewApp, make_server
    from .store import DecisionStore

    try:
        config = build_config(args)
        catalog = build_catalog(config)
    except UsageError as err:
        LOGGER.error("%s", err)
        return err.code
    except CatalogError as err:
        LOGGER.error("%s", err)
        return EXIT_INPUT_MISSING
    store = DecisionStore(config.review_dir, config.output_dir, catalog, container=config.container)
    store.reconcile()
    app = ReviewApp(catalog=catalog, store=store, rater=config.rater)
    try:
        server = make_server(app, config.host, config.port)
    except OSError as err:
        LOGGER.error("cannot listen on %s:%s (%s); choose another --port", config.host, config.port, err)
        return EXIT_USAGE
    host, port = server.server_address[:2]
    if not str(host).startswith("127.") and str(host) not in ("::1", "localhost"):
        LOGGER.warning("listening on %s, not the loopback address: anyone who can reach this port and sees "
                       "the token can read the images and change decisions; prefer an SSH tunnel", host)
    shown_host = f"[{host}]" if ":" in str(host) else host
    LOGGER.info("%d lesions of %d participant/session(s), %d at or above the %s threshold; rater %s; "
                "annotations -> %s", len(catalog.lesions), len(catalog.units), int(catalog.lesions["above"].sum()),
                config.operating_point, config.rater, config.review_dir)
    print(f"qsmrim-review: open http://{shown_host}:{port}/?token={app.token}", flush=True)

    def stop(signum, frame):  # SIGTERM ends like Ctrl-C: every acknowledged decision is already on disk
        threading.Thread(target=server.shutdown, daemon=True).start()

    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (embedded use): the caller stops the server
        pass
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    LOGGER.info("stopped; annotations are in %s", config.review_dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
