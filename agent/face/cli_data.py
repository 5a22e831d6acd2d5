"""``hs-gossip put | get | del | ls | verify``: collections through the local API."""

from __future__ import annotations

import argparse
import json
import urllib.parse

from agent.face.cli_common import (
    ApiError,
    Command,
    UsageError,
    add_api_argument,
    api_request,
    fail,
)
from agent.face.json_input import InputError, parse_body


def _quote(what: str, text: str) -> str:
    try:
        return urllib.parse.quote(text, safe="")
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        raise UsageError(f"{what} {text!r} is not valid UTF-8") from None


def _path(name: str, key: str | None = None) -> str:
    p = "/api/collections/" + _quote("collection", name)
    if key is not None:
        p += "/items/" + _quote("key", key)
    return p


def _call(args: argparse.Namespace, method: str, path: str, body: object = None) -> int:
    try:
        status, doc = api_request(args, method, path, body)
    except ApiError as e:
        return fail(str(e))
    if status >= 400:
        err = doc.get("error") if isinstance(doc, dict) else doc
        return fail(f"{err}", 1 if status != 400 else 2)
    print(json.dumps(doc, indent=2 if getattr(args, "pretty", False) else None))
    return 0


def cmd_put(args: argparse.Namespace) -> int:
    try:
        # the agent's own rules (no NaN, 64-bit integers, ...), checked before sending
        value = parse_body(args.value.encode("utf-8", "surrogateescape"))
    except InputError as e:
        return fail(f"value is not JSON the agent accepts: {args.value!r}: {e} "
                    "(quote strings: '\"text\"')", 2)
    return _call(args, "PUT", _path(args.collection, args.key), {"value": value})


def _put_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("collection")
    p.add_argument("key")
    p.add_argument("value", help="a JSON value, e.g. '{\"x\": 1}'")
    add_api_argument(p)



def cmd_get(args: argparse.Namespace) -> int:
    try:
        status, doc = api_request(args, "GET", _path(args.collection, args.key))
    except ApiError as e:
        return fail(str(e))
    if status == 404:
        return fail(doc.get("error", "not found") if isinstance(doc, dict) else "not found")
    if status >= 400:
        return fail(str(doc.get("error") if isinstance(doc, dict) else doc), 2)
    if not args.full and "value_error" in doc:  # stored, but JSON cannot carry it
        return fail(f"{doc['value_error']} (--full shows its stored bytes)")
    print(json.dumps(doc if args.full else doc["value"]))
    return 0


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("collection")
    p.add_argument("key")
    add_api_argument(p)


def _get_args(p: argparse.ArgumentParser) -> None:
    _key_args(p)
    p.add_argument("--full", action="store_true", help="print the version too")



def cmd_del(args: argparse.Namespace) -> int:
    return _call(args, "DELETE", _path(args.collection, args.key))



def cmd_ls(args: argparse.Namespace) -> int:
    if not args.collection:
        return _call(args, "GET", "/api/collections")
    q = urllib.parse.urlencode({k: v for k, v in (("prefix", args.prefix),
                                                  ("limit", str(args.limit))) if v})
    return _call(args, "GET", _path(args.collection) + "/items?" + q)


def _ls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("collection", nargs="?")
    p.add_argument("--prefix", default="")
    p.add_argument("--limit", type=int, default=100)
    add_api_argument(p)



def cmd_verify(args: argparse.Namespace) -> int:
    path = _path(args.collection) + "/verify" + ("?repair=1" if args.repair else "")
    try:
        status, doc = api_request(args, "POST", path)
    except ApiError as e:
        return fail(str(e))
    if status >= 400:
        return fail(str(doc.get("error") if isinstance(doc, dict) else doc))
    print(json.dumps(doc, indent=2))
    return 0 if doc.get("ok") or doc.get("repaired") else 1


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("collection")
    p.add_argument("--repair", action="store_true", help="rewrite the index if it differs")
    add_api_argument(p)


COMMANDS: tuple[Command, ...] = (
    Command("put", cmd_put, _put_args),
    Command("get", cmd_get, _get_args),
    Command("del", cmd_del, _key_args),
    Command("ls", cmd_ls, _ls_args),
    Command("verify", cmd_verify, _verify_args),
)
