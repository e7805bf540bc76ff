"""The local review server: one token, a page, a small JSON API, nothing served from disk by name.

Every request must carry the token (``?token=`` or the ``X-Qsmrim-Token`` header) or it gets 403,
so another user of a shared login node cannot read the images or change the decisions. Labels from
the URL or the body are validated (letters and digits) and looked up among the reviewed units;
no request names a file, so there is nothing to traverse.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .catalog import Catalog, ReviewUnit, field_of_view_mm, parse_label
from .images import CHANNELS, ORIENTATION, VIEWS, VolumeCache, render, scale_bar_mm
from .store import DECISIONS, DecisionStore, majority

LOGGER = logging.getLogger("qsmrim.review")
TOKEN_HEADER = "X-Qsmrim-Token"
MAX_BODY = 4096


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ReviewApp:
    """Everything a request handler needs: the catalog, the store, the rater and the token."""

    catalog: Catalog
    store: DecisionStore
    rater: str
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    volumes: VolumeCache = field(default_factory=VolumeCache)

    # -- helpers -----------------------------------------------------------------------------
    def lookup(self, participant: Any, session: Any, lesion_id: Any) -> tuple[ReviewUnit, Any]:
        subject = parse_label(participant, "sub-")
        if subject is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid participant label {participant!r}")
        if session in (None, "", "null"):
            ses = None
        else:
            ses = parse_label(session, "ses-")
            if ses is None:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid session label {session!r}")
        unit = self.catalog.unit(subject, ses)
        if unit is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no reviewed outputs for sub-{subject}"
                               + (f" ses-{ses}" if ses else ""))
        try:
            number = int(lesion_id)
            if isinstance(lesion_id, bool) or str(number) != str(lesion_id).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"invalid lesion_id {lesion_id!r}") from None
        row = self.catalog.row(unit.unit, number)
        if row is None:
            raise RequestError(HTTPStatus.NOT_FOUND, f"{unit.unit.prefix} has no lesion {number}")
        return unit, row

    def _item(self, row, decision: str | None) -> dict:
        return {"participant": f"sub-{row['subject']}", "session": row["session"] or None,
                "lesion_id": int(row["lesion_id"]), "probability": _number(row["probability"]),
                "uncertainty": _number(row["uncertainty"]), "decision": decision}

    def _all_decisions(self) -> dict[tuple[str, str | None], dict[int, dict[str, str]]]:
        return {(u.unit.subject, u.unit.session or ""): self.store.decisions(u.unit)
                for u in self.catalog.units.values()}

    # -- endpoints ---------------------------------------------------------------------------
    def queue(self) -> list[dict]:
        decisions = self._all_decisions()
        items = []
        for row in self.catalog.lesions.to_dict("records"):
            mine = decisions[(row["subject"], row["session"])].get(int(row["lesion_id"]), {}).get(self.rater)
            items.append(self._item(row, mine))
        return items

    def status(self) -> dict:
        decisions = self._all_decisions()
        lesions = self.catalog.lesions
        reviewed = rimpos = 0
        disagreements, raters = [], set()
        for row in lesions.to_dict("records"):
            calls = decisions[(row["subject"], row["session"])].get(int(row["lesion_id"]), {})
            raters |= set(calls)
            if self.rater in calls:
                reviewed += 1
                rimpos += calls[self.rater] == "rimpos"
            if len({c for c in calls.values()}) > 1:
                disagreements.append({"participant": f"sub-{row['subject']}", "session": row["session"] or None,
                                      "lesion_id": int(row["lesion_id"])})
        return {"rater": self.rater, "operating_point": self.catalog.operating_point,
                "n_lesions": int(len(lesions)), "n_above_threshold": int(lesions["above"].sum()),
                "reviewed": reviewed, "rimpos": rimpos, "raters": sorted(raters),
                "disagreements": disagreements, "keys": KEYS}

    def lesion(self, query: dict[str, str]) -> dict:
        unit, row = self.lookup(query.get("participant"), query.get("session"), query.get("lesion_id"))
        calls = self.store.decisions(unit.unit).get(int(row["lesion_id"]), {})
        fov = field_of_view_mm(row["volume_mm3"])
        volumes = self.volumes.get(unit)
        return {**self._item(row, calls.get(self.rater)),
                "votes": _number(row.get("votes")), "threshold": float(row["threshold_review"]),
                "above_threshold": bool(row["above"]), "rim_positive_at_participant_level": int(row["rim_positive"]),
                "volume_mm3": _number(row["volume_mm3"]), "voxels": int(row["voxels"]),
                "centroid_mm": [_number(row[f"centroid_{a}_mm"]) for a in "xyz"],
                "decisions": calls, "majority": {0: None, 1: "rimneg", 2: "rimpos"}[majority(calls.values())],
                "disagreement": len(set(calls.values())) > 1, "fov_mm": fov,
                "scale_bar_mm": scale_bar_mm(fov), "orientation": ORIENTATION, "model_id": unit.model_id,
                "qsm_available": volumes.qsm_ppb is not None, "qsm_problem": volumes.qsm_message,
                "default_window_ppb": volumes.qsm_window,
                "flair_available": unit.flair is not None,
                "track": self._track(unit.unit, int(row["lesion_id"]))}

    def _track(self, unit, lesion_id: int) -> dict | None:
        """The lesion's track over the sessions (group level), each session's lesion with its probability."""
        track = self.catalog.tracks.get((unit.subject, unit.session or "", lesion_id))
        if track is None:
            return None
        sessions = []
        for session, ids in track.lesions:
            other = self.catalog.unit(track.subject, session)
            row = self.catalog.row(other.unit, ids[0]) if other is not None else None
            mine = self.store.decisions(other.unit).get(ids[0], {}).get(self.rater) if other is not None else None
            sessions.append({"session": session, "lesion_ids": list(ids), "reviewable": row is not None,
                             "probability": _number(row["probability"]) if row is not None else None,
                             "volume_mm3": _number(row["volume_mm3"]) if row is not None else None,
                             "current": session == (unit.session or "") and lesion_id in ids, "decision": mine})
        return {"track_id": track.track_id, "status": track.status, "sessions": sessions}

    def image(self, query: dict[str, str]) -> bytes:
        unit, row = self.lookup(query.get("participant"), query.get("session"), query.get("lesion_id"))
        view, channel = query.get("view", "axial"), query.get("channel", "qsm")
        if view not in VIEWS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"view must be one of {', '.join(VIEWS)}")
        if channel not in CHANNELS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"channel must be one of {', '.join(CHANNELS)}")
        outline = query.get("outline", "1")
        if outline not in ("0", "1"):
            raise RequestError(HTTPStatus.BAD_REQUEST, "outline must be 0 or 1")
        zoom = _bounded(query.get("zoom"), "zoom", 1.0, 0.25, 16.0)
        volumes = self.volumes.get(unit)
        window = _bounded(query.get("window"), "window", volumes.qsm_window, 1.0, 5000.0)
        fov = field_of_view_mm(row["volume_mm3"])
        offset = _bounded(query.get("offset"), "offset", 0.0, -fov, fov)  # mm off the centre (optional)
        centre = [float(row[f"centroid_{a}_mm"]) for a in "xyz"]
        return render(volumes, centre, int(row["lesion_id"]), view, channel,
                      outline=outline == "1", zoom=zoom, window=window, fov_mm=fov, offset_mm=offset)

    def decide(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        unknown = set(body) - {"participant", "session", "lesion_id", "decision", "track"}
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields {sorted(unknown)}")
        decision = body.get("decision")
        if decision is not None and decision not in DECISIONS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"decision must be one of {', '.join(DECISIONS)} or null")
        whole_track = body.get("track", False)
        if not isinstance(whole_track, bool):
            raise RequestError(HTTPStatus.BAD_REQUEST, "track must be true or false")
        unit, row = self.lookup(body.get("participant"), body.get("session"), body.get("lesion_id"))
        track = self.catalog.tracks.get((unit.unit.subject, unit.unit.session or "", int(row["lesion_id"])))
        if whole_track and track is None:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{unit.unit.prefix} lesion {int(row['lesion_id'])} is in "
                                                       "no lesion track (run the group level on 2+ sessions)")
        calls = self.store.decide(unit, int(row["lesion_id"]), self.rater, decision, float(row["probability"]))
        applied = [{"session": unit.unit.session, "lesion_id": int(row["lesion_id"])}]
        if whole_track:  # the same call on the track's lesions of every session (each one decision row)
            for session, ids in track.lesions:
                other = self.catalog.unit(track.subject, session)
                for lid in ids:
                    other_row = self.catalog.row(other.unit, lid) if other is not None else None
                    if other_row is None or (other.unit == unit.unit and lid == int(row["lesion_id"])):
                        continue
                    self.store.decide(other, lid, self.rater, decision, float(other_row["probability"]))
                    applied.append({"session": session, "lesion_id": lid})
        return {**self._item(row, calls.get(self.rater)), "applied": applied}


KEYS = {"rimpos": "1", "rimneg": "2", "unsure": "3", "clear": "0", "next": "ArrowRight / j",
        "previous": "ArrowLeft / k", "outline": "o", "zoom in": "+", "zoom out": "-",
        "window narrower": "[", "window wider": "]"}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _bounded(value: str | None, name: str, default: float, low: float, high: float) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be a number") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name} must be within [{low:g}, {high:g}]")
    return number


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`ReviewApp` of the server (``self.server.app``)."""

    server_version = "qsmrim-review"
    sys_version = ""

    @property
    def app(self) -> ReviewApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one debug line per request
        LOGGER.debug("%s %s", self.address_string(), fmt % args)

    def _authorised(self, query: dict[str, str]) -> bool:
        given = self.headers.get(TOKEN_HEADER) or query.get("token") or ""
        return hmac.compare_digest(given.encode(), self.app.token.encode())

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
                         "script-src 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        self._send(status, json.dumps(data, allow_nan=False).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json(status, {"error": message})

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if not self._authorised(query):
            self._send(HTTPStatus.FORBIDDEN, b"403 forbidden: open the URL that qsmrim-review printed "
                                             b"(it carries the access token)\n", "text/plain; charset=utf-8")
            return
        try:
            if method == "GET" and parts.path == "/":
                self._send(HTTPStatus.OK, page_html().encode(), "text/html; charset=utf-8")
            elif method == "GET" and parts.path == "/api/queue":
                self._json(HTTPStatus.OK, self.app.queue())
            elif method == "GET" and parts.path == "/api/status":
                self._json(HTTPStatus.OK, self.app.status())
            elif method == "GET" and parts.path == "/api/lesion":
                self._json(HTTPStatus.OK, self.app.lesion(query))
            elif method == "GET" and parts.path == "/api/lesion.png":
                self._send(HTTPStatus.OK, self.app.image(query), "image/png")
            elif method == "POST" and parts.path == "/api/decision":
                self._json(HTTPStatus.OK, self.app.decide(self._body()))
            elif parts.path in ("/", "/api/queue", "/api/status", "/api/lesion", "/api/lesion.png", "/api/decision"):
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {parts.path}")
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {parts.path}")
        except RequestError as err:
            self._error(err.status, str(err))
        except Exception as err:  # a broken image must not take the server down; the rater sees why
            LOGGER.exception("request %s failed", parts.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, "invalid Content-Length") from None
        if length <= 0 or length > MAX_BODY:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body must be a JSON object under {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not valid JSON") from None

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")


def make_server(app: ReviewApp, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Bound (not yet serving) server; ``port=0`` picks a free port (``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    return server
