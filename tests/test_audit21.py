"""Audit 21: the header-obfuscation permutations of published smuggling tools, end to end.

Sources, ported permutation by permutation and named as the tools name them:

* PortSwigger/http-request-smuggler, `src/burp/DesyncBox.java` (`applyDesync`): the shared and
  HTTP/1 permutations (`vanilla`, `underjoin1`, `spacejoin1`, `space1`, `nameprefix1/2`,
  `valueprefix1`, `vertwrap`, `connection`, `spjunk`, `backslash`, `spaceFF`, `unispace`,
  `commaCow`, `cowComma`, `contentEnc`, `quoted`, `aposed`, `dualchunk`, `lazygrep`, `0dsuffix`,
  `tabsuffix`, `revdualchunk`, `nested`, `encode`, `accentTE`, `accentCH`, `spacefix1:N`,
  `prefix1:N`, `suffix1:N` for N in getSpecialChars() = 0, 9, 11, 12, 13, 127, `nospace1`,
  `linewrapped1`, `gareth1`, `badsetupCR`, `badsetupLF`, `multiCase`, `tabwrap`, `UPPERCASE`,
  `0dwrap`, `0dspam`, `badwrap`, `bodysplit`). The `h2*`/`http2*` ones are HTTP/2-only and skipped.
  As in Burp, the Transfer-Encoding-only techniques are applied to Transfer-Encoding only; the
  generic ones are applied to Transfer-Encoding and, for the CL.0 / 0.CL templates, to
  Content-Length (a technique that would leave the request unchanged is skipped, as Burp does).
* hahwul/smugglex, `src/payloads/te_variations.rs` (`get_te_header_variations`, used for its CL.TE
  and TE.CL payloads) and `src/payloads/te_te.rs` (`get_te_te_payloads`: pairs of TE lines with
  `Content-Length: 4`). smugglex has no names, so its cases are named by list index and comment.
  Its "extended ASCII" entries go through `String::from_utf8_lossy`, so on the wire they are all
  U+FFFD (`EF BF BD`); they are ported with the byte the comment intends (0x85, 0xA0, 0xAD, 0xFF,
  0x82, 0x96) plus one case with the bytes smugglex really sends.

Each permutation is applied to attack templates whose body hides `GET /smuggled HTTP/1.1`:
CL.TE (CL covers `0\\r\\n\\r\\n` + the hidden request; TE would end the body before it), TE.CL
(`Content-Length: 4`, the hidden request in a chunk), TE.TE (a vanilla TE line plus the permuted
one, no CL), CL.0 (a permuted CL on a POST whose body is the hidden request) and 0.CL (the same on
a GET).

Oracle. What laneproxy must do is derived from the RFC 9112 grammar and docs/http-rules.md, not
from laneproxy: any bare CR/LF, fold or whitespace-led line, non-token name or CTL in a value is
400 (R2, R3, R4, R10, R11, R12); TE with CL is 400 (F1), or 501 when the coding is not chunked; a
TE list other than exactly `chunked` is 400/501 (F2, F3); a bad or repeated CL is 400 (F5);
underscore names are dropped (a2). Otherwise exactly one canonical request is forwarded, framed as
the RFC reads it. Every refusal carries `Connection: close` and closes; every case ends with a
canary on a fresh connection that must get its own 200. The corpus harness (`drive`,
`check_client`, `strict_requests`) checks the client side and what the upstream got.

One deliberate difference from the corpus's blanket "the word `smuggled` never reaches the
upstream": a hidden request may reach the upstream as body bytes of the request that carries it
(canonically framed, so no back end can read it as a request). And when the permuted line is
legitimately *not* a framing field (`underjoin1` is dropped, `contentEnc` and `encode` are other
fields), the bytes after the real body are the client's own next request on its own connection:
it is forwarded as such and answered to that same client in order; the canary shows no desync.
Such cases are marked `own` and the client must get `GET /smuggled` answered to itself.

The cases of one template run concurrently, each against its own in-process proxy and upstream.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import pytest
import yaml

from laneproxy.config import parse_config
from laneproxy.server import Proxy
from tests.conftest import Upstream, make_config
from tests.test_audit3 import REQUEST_CASES as AUDIT3_CASES
from tests.test_audit16 import REQUEST_CASES as AUDIT16_CASES
from tests.test_smuggling_corpus import (
    BASE_CFG,
    CANARY,
    NEXT,
    SMUG,
    Backend,
    Case,
    Want,
    check_client,
    drive,
    match,
    settle,
    upstream_requests,
)
from tests.test_smuggling_corpus import (
    CASES as CORPUS_CASES,
)

pytestmark = [pytest.mark.timeout(60)]

PARALLEL = 48  # cases in flight at once (each with its own proxy and upstream)
WAIT = 5.0  # bound for each network await under that load

# == the permutations ===================================================================================

SPECIAL_CHARS = (0, 9, 11, 12, 13, 127)  # DesyncBox.getSpecialChars()
GENERIC = ("vanilla", "underjoin1", "spacejoin1", "space1", "nameprefix1", "nameprefix2", "valueprefix1",
           "vertwrap", "connection", "spjunk", "backslash", "spaceFF", "unispace",
           *(f"spacefix1:{i}" for i in SPECIAL_CHARS), *(f"prefix1:{i}" for i in SPECIAL_CHARS),
           "nospace1", "linewrapped1", "gareth1", "badsetupCR", "badsetupLF", "multiCase", "tabwrap",
           "UPPERCASE", "0dwrap", "0dspam", "badwrap")
TE_ONLY = ("commaCow", "cowComma", "contentEnc", "quoted", "aposed", "dualchunk", "lazygrep", "0dsuffix",
           "tabsuffix", "revdualchunk", "nested", "encode", "accentTE", "accentCH",
           *(f"suffix1:{i}" for i in SPECIAL_CHARS), "bodysplit")
BURP_TE = GENERIC + TE_ONLY
BURP_CL = GENERIC


def burp(name: bytes, value: bytes, technique: str) -> tuple[bytes, bytes]:
    """DesyncBox.applyDesync for one header line: (what replaces `name: value`, a line Burp inserts
    right after the request line or b"")."""
    header = name + b": "
    line = header + value
    simple = {
        "vanilla": line,
        "underjoin1": header.replace(b"-", b"_") + value,
        "spacejoin1": header.replace(b"-", b" ") + value,
        "space1": header.replace(b":", b" :") + value,
        "nameprefix1": b"Foo: bar\r\n " + line,
        "nameprefix2": b"Foo: bar\r\n\t" + line,
        "valueprefix1": header + b" " + value,
        "nospace1": header.replace(b" ", b"") + value,
        "linewrapped1": header.replace(b" ", b"\n ") + value,
        "gareth1": header.replace(b":", b"\n :") + value,
        "badsetupCR": b"Foo: bar\r" + line,
        "badsetupLF": b"Foo: bar\n" + line,
        "vertwrap": header + b"\n\x0b" + value,
        "tabwrap": header + b"\r\n\t" + value,
        "multiCase": header[:1].lower() + header[1:].upper() + value,
        "UPPERCASE": header.upper() + value,
        "0dwrap": b"Foo: bar\r\n\r" + line,
        "0dspam": header[:3] + b"\r" + header[3:] + value,
        "connection": b"Connection: " + name + b"\r\n" + line,
        "spjunk": header.replace(b":", b" x:") + value,
        "backslash": header.replace(b"-", b"\\") + value,
        "spaceFF": header[:-1] + b"\xff" + value,
        "unispace": header[:-1] + b"\xa0" + value,
        "badwrap": b"X-Blah-Ignore: " + value,
    }
    for i in SPECIAL_CHARS:
        simple[f"spacefix1:{i}"] = header.replace(b" ", b"") + bytes([i]) + value
        simple[f"prefix1:{i}"] = header + bytes([i]) + value
    if name == b"Transfer-Encoding":
        simple.update({
            "commaCow": header + b"chunked, identity",
            "cowComma": header + b"identity, " + value,
            "contentEnc": b"Content-Encoding: " + value,
            "quoted": header + b'"chunked"',
            "aposed": header + b"'chunked'",
            "dualchunk": line + b"\r\nTransfer-encoding: identity",  # addOrReplaceHeader is case-sensitive
            "lazygrep": header + b"chunk",
            "0dsuffix": line + b"\r",
            "tabsuffix": line + b"\t",
            "revdualchunk": header + b"identity\r\n" + line,
            "nested": header + b"identity, chunked, identity",
            "encode": b"Transfer-%45ncoding: " + value,
            "accentTE": b"Transf\x82r-Encoding: " + value,
            "accentCH": header + b"ch\x96nked",
            "bodysplit": b"X: y\r\nFoo: barn\n\nTransfer-Encoding: chunked",
        })
        for i in SPECIAL_CHARS:
            simple[f"suffix1:{i}"] = line + bytes([i])
    insert = b" " + line + b"\r\n" if technique == "badwrap" else b""
    return simple[technique], insert


NEL, NBSP, SHY, FF8, E82, E96 = b"\x85", b"\xa0", b"\xad", b"\xff", b"\x82", b"\x96"
TE = b"Transfer-Encoding"
# smugglex get_te_header_variations(), in order: (comment, header line)
SMUGGLEX_TE: list[tuple[str, bytes]] = [
    ("vanilla", TE + b": chunked"),
    ("space-prefix", b" " + TE + b": chunked"),
    ("tab-prefix", b"\t" + TE + b": chunked"),
    ("space-before-colon", TE + b" : chunked"),
    ("double-space-before-colon", TE + b"  : chunked"),
    ("tab-before-colon", TE + b"\t: chunked"),
    ("tab-after-colon", TE + b":\tchunked"),
    ("tab-around-colon", TE + b"\t:\tchunked"),
    ("double-space-after-colon", TE + b":  chunked"),
    ("no-space-after-colon", TE + b":chunked"),
    ("trailing-space", TE + b": chunked "),
    ("trailing-tab", TE + b": chunked\t"),
    ("cr-suffix", TE + b": chunked\r"),
    ("lf-space-fold", TE + b":\n chunked"),
    ("crlf-space-fold", TE + b":\r\n chunked"),
    ("crlf-tab-fold", TE + b":\r\n\tchunked"),
    ("crlf-before-colon", TE + b"\r\n : chunked"),
    ("double-wrapped", TE + b":\r\n \r\n chunked"),
    ("folded-after-header", b"Foo: bar\r\n " + TE + b": chunked"),
    ("tab-folded-after-header", b"Foo: bar\r\n\t" + TE + b": chunked"),
    ("vt-after-colon", TE + b":\x0bchunked"),
    ("vt-in-value", TE + b": \x0bchunked"),
    ("ff-after-colon", TE + b":\x0cchunked"),
    ("vt-wrap-after-value", TE + b": chunked\n\x0b"),
    ("nul-prefix", b"\x00" + TE + b": chunked"),
    ("nul-in-name", TE + b"\x00: chunked"),
    ("nul-suffix", TE + b": chunked\x00"),
    ("del-prefix", b"\x7f" + TE + b": chunked"),
    ("del-in-name", TE + b"\x7f: chunked"),
    ("double-quoted", TE + b': "chunked"'),
    ("single-quoted", TE + b": 'chunked'"),
    ("chunked-comma-identity", TE + b": chunked, identity"),
    ("identity-comma-chunked", TE + b": identity, chunked"),
    ("chunked-comma-identity-nospace", TE + b": chunked,identity"),
    ("identity-comma-chunked-nospace", TE + b": identity,chunked"),
    ("chunked-spaced-comma-identity", TE + b": chunked , identity"),
    ("nested", TE + b": identity, chunked, identity"),
    ("underscore-name", b"Transfer_Encoding: chunked"),
    ("space-name", b"Transfer Encoding: chunked"),
    ("backslash-name", b"Transfer\\Encoding: chunked"),
    ("nul-for-hyphen", b"Transfer\x00Encoding: chunked"),
    ("lowercase", b"transfer-encoding: chunked"),
    ("uppercase-name", b"TRANSFER-ENCODING: chunked"),
    ("all-uppercase", b"TRANSFER-ENCODING: CHUNKED"),
    ("mixed-case", b"tRaNsFeR-eNcOdInG: cHuNkEd"),
    ("first-letter-caps", b"Transfer-encoding: chunked"),
    ("truncated-value", TE + b": chunk"),
    ("uppercase-value", TE + b": CHUNKED"),
    ("mixed-case-extra-space", TE + b":  Chunked"),
    ("cr-only-before", b"Foo: bar\r" + TE + b": chunked"),
    ("lf-only-before", b"Foo: bar\n" + TE + b": chunked"),
    ("extra-cr", b"Foo: bar\r\n\r" + TE + b": chunked"),
    ("cr-in-name", b"Tra\rnsfer-Encoding: chunked"),
    ("cr-after-hyphen", b"Transfer-\rEncoding: chunked"),
    ("cr-space-after-colon", TE + b":\r chunked"),
    ("junk-before-colon", TE + b" x: chunked"),
    ("junk-in-value", TE + b": x chunked"),
    ("junk-header-before", b"X: y\r\n" + TE + b": chunked"),
    ("url-encoded-name", b"Transfer-%45ncoding: chunked"),
    ("url-encoded-value", TE + b": %63hunked"),
    ("mime-b64-iso", TE + b": =?iso-8859-1?B?Y2h1bmtlZA==?="),
    ("mime-b64-utf8", TE + b": =?UTF-8?B?Y2h1bmtlZA==?="),
    ("http10-style", TE + b": chunked"),
    ("nel-in-name", TE + NEL + b": chunked"),
    ("nbsp-in-name", TE + NBSP + b": chunked"),
    ("shy-for-hyphen", b"Transfer" + SHY + b"Encoding: chunked"),
    ("nbsp-after-colon", TE + b":" + NBSP + b"chunked"),
    ("ff-byte-in-value", TE + b": " + FF8 + b"chunked"),
    ("accent-in-name", b"Transf" + E82 + b"r-Encoding: chunked"),
    ("accent-in-value", TE + b": ch" + E96 + b"nked"),
    ("as-sent-lossy-in-name", TE + "\ufffd".encode() + b": chunked"),
    *((f"prefix-0x{c:02x}", bytes([c]) + TE + b": chunked") for c in (0x00, 0x0A, 0x0B, 0x0C, 0x0D, 0x7F)),
    *((f"suffix-0x{c:02x}", TE + b": chunked" + bytes([c])) for c in (0x00, 0x09, 0x0B, 0x0C, 0x7F)),
    *((f"name-suffix-0x{c:02x}", TE + bytes([c]) + b": chunked") for c in (0x00, 0x09, 0x0B, 0x0C, 0x7F)),
]
# smugglex get_te_te_payloads(): (first TE line, second TE line)
SMUGGLEX_TE_TE: list[tuple[bytes, bytes]] = [
    *((TE + b": chunked", TE + b": " + v) for v in (b"identity", b"x-custom", b"cow", b"compress", b"deflate",
                                                     b"gzip")),
    (TE + b": identity", TE + b": chunked"),
    *((TE + b": chunked", TE + b": " + v) for v in (b"gzip, chunked", b"chunked, identity", b"identity, chunked",
                                                     b"identity, chunked, identity")),
    *((TE + b": chunked", v) for v in (
        b" " + TE + b": chunked", b"\t" + TE + b": chunked", TE + b" : chunked", TE + b":\tchunked",
        TE + b":  chunked", TE + b":chunked", TE + b': "chunked"', TE + b": 'chunked'",
        b"transfer-encoding: chunked", b"TRANSFER-ENCODING: CHUNKED", b"TRANSFER-ENCODING: chunked",
        b"TrAnSfEr-EnCoDiNg: ChUnKeD", b"Transfer-encoding: chunked", b"Transfer_Encoding: chunked",
        b"Transfer Encoding: chunked", b"Transfer\\Encoding: chunked", TE + b":\n chunked", TE + b":\r\n chunked",
        TE + b":\r\n\tchunked", TE + b":\x0bchunked", TE + b": chunked\r", TE + b": chunked\t",
        TE + b": chunked\x00", TE + b": chunk", b"Foo: bar\r" + TE + b": chunked", b"Foo: bar\n" + TE + b": chunked",
        b"Content-Encoding: chunked", b"Transfer-%45ncoding: chunked",
        b"Connection: Transfer-Encoding\r\n" + TE + b": chunked", TE + NEL + b": chunked", TE + NBSP + b": chunked",
    )),
]

# == the templates ======================================================================================

HOST = b"Host: t.example\r\n"
CL_TE_BODY = b"0\r\n\r\n" + SMUG
TE_CL_BODY = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUG), SMUG)


def request(method: bytes, lines: list[bytes], body: bytes, insert: bytes = b"") -> bytes:
    return b"%s /c HTTP/1.1\r\n%s%s%s\r\n%s" % (method, insert, HOST, b"".join(x + b"\r\n" for x in lines), body)


def templates_for_te(line: bytes, insert: bytes = b"") -> dict[str, bytes]:
    return {
        "CL.TE": request(b"POST", [b"Content-Length: %d" % len(CL_TE_BODY), line], CL_TE_BODY, insert),
        "TE.CL": request(b"POST", [line, b"Content-Length: 4"], TE_CL_BODY, insert),
        "TE.TE": request(b"POST", [TE + b": chunked", line], TE_CL_BODY, insert),
    }


def templates_for_cl(line: bytes, insert: bytes = b"") -> dict[str, bytes]:
    return {"CL.0": request(b"POST", [line], SMUG, insert), "0.CL": request(b"GET", [line], SMUG, insert)}


# == the oracle: RFC 9112 grammar + docs/http-rules.md ==================================================

FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*(.*?)[ \t]*", re.S)
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@dataclass(frozen=True)
class Expect:
    refuse: tuple[int, ...] = ()  # allowed refusal statuses; () = must forward
    framing: str = ""  # chunked | cl | none
    body: bytes = b""
    rest: bytes = b""  # what follows the first request on the client connection


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    out, pos = bytearray(), 0
    while True:
        nl = data.index(b"\r\n", pos)
        size = int(data[pos:nl], 16)
        pos = nl + 2
        if size == 0:
            assert data[pos:pos + 2] == b"\r\n"
            return bytes(out), data[pos + 2:]
        out += data[pos:pos + size]
        pos += size + 2


def rfc_view(wire: bytes) -> Expect:
    end = wire.index(b"\r\n\r\n")
    head, body = wire[:end], wire[end + 4:]
    if BARE_CR_LF.search(head):
        return Expect((400,))  # R2 / R3
    fields = []
    for line in head.split(b"\r\n")[1:]:
        m = FIELD.fullmatch(line)
        if line[:1] in (b" ", b"\t") or not m or not FIELD_VALUE.fullmatch(m[2]):
            return Expect((400,))  # R4 / R11 / R10 / non-token name / R12
        if b"_" not in m[1]:  # underscore names are dropped (a2)
            fields.append((m[1].lower(), m[2]))
    te = [v for n, v in fields if n == b"transfer-encoding"]
    cl = [v for n, v in fields if n == b"content-length"]
    codings = [c.strip(b" \t").lower() for v in te for c in v.split(b",")]
    if te and cl:
        return Expect((400,) if codings == [b"chunked"] else (400, 501))  # F1
    if te:
        if codings != [b"chunked"]:
            if b"chunked" in codings[:-1]:
                return Expect((400,))  # F2: chunked applied twice, or not the final coding
            if codings[-1] == b"chunked":
                return Expect((501,))  # F3: chunked last, an unknown coding before it (a2)
            return Expect((400, 501))  # no chunked at all: F2 (400) or F3 (501)
        decoded, rest = dechunk(body)
        return Expect(framing="chunked", body=decoded, rest=rest)
    if cl:
        if len(cl) > 1 or not re.fullmatch(rb"[0-9]+", cl[0]):
            return Expect((400,))  # F5
        n = int(cl[0])
        return Expect(framing="cl", body=body[:n], rest=body[n:])
    return Expect(framing="none", rest=body)


# == the cases ==========================================================================================


@dataclass(frozen=True)
class Perm:
    case: Case
    template: str
    tool: str
    name: str
    own: bool  # the client's own pipelined GET /smuggled is legitimately forwarded
    aliases: tuple[str, ...] = ()


def echo_check(wants: list[Want]):
    def check(obs) -> None:
        got = [body for status, _, body in obs.finals if status == 200]
        want = [b"%s %s body=%d" % (w.method, w.target, len(w.body)) for w in wants]
        assert got == want[:len(got)], f"responses {got} != {want}"
    return check


def make_case(cid: str, wire: bytes) -> tuple[Case, bool]:
    method = wire.split(b" ", 1)[0]
    view = rfc_view(wire)
    if view.refuse:
        return Case(cid, wire, {s: () for s in view.refuse}), False
    framing = view.framing if view.framing != "none" or method != b"POST" else "cl"
    first = Want(method, b"/c", view.body, framing if (view.body or method == b"POST") else "none")
    wants, more, conn, own = [first], (), "auto", False
    if view.rest == SMUG:
        wants, more, own = [first, Want(b"GET", b"/smuggled")], (200,), True
    elif view.rest == SMUG + b"\r\n0\r\n\r\n":
        wants, more, conn, own = [first, Want(b"GET", b"/smuggled")], (200, 400), "close", True
    else:
        assert view.rest == b"", f"{cid}: unexpected rest {view.rest!r}"
    return Case(cid, wire, {200: tuple(wants)}, more=more, conn=conn, method=method, check=echo_check(wants)), own


def build() -> list[Perm]:
    sources: list[tuple[str, str, str, bytes]] = []  # (template, tool, name, wire)
    for tech in BURP_TE:
        line, insert = burp(TE, b"chunked", tech)
        for tpl, wire in templates_for_te(line, insert).items():
            sources.append((tpl, "burp", tech, wire))
    for tech in BURP_CL:
        line, insert = burp(b"Content-Length", b"%d" % len(SMUG), tech)
        for tpl, wire in templates_for_cl(line, insert).items():
            sources.append((tpl, "burp", tech, wire))
    for i, (comment, line) in enumerate(SMUGGLEX_TE):
        for tpl, wire in templates_for_te(line).items():
            if tpl != "TE.TE":  # smugglex uses te_variations for CL.TE and TE.CL
                sources.append((tpl, "smugglex", f"te_variations[{i}]:{comment}", wire))
    for i, (te1, te2) in enumerate(SMUGGLEX_TE_TE):
        wire = request(b"POST", [b"Content-Length: 4", te1, te2], TE_CL_BODY)
        sources.append(("TE.TE+CL4", "smugglex", f"te_te[{i}]", wire))
    elsewhere = {c.wire for c in CORPUS_CASES + AUDIT3_CASES + AUDIT16_CASES}
    by_wire: dict[bytes, Perm] = {}
    for tpl, tool, name, wire in sources:
        if wire in elsewhere:
            continue
        if wire in by_wire:  # the same bytes under another name: one case, both names kept
            p = by_wire[wire]
            by_wire[wire] = Perm(p.case, p.template, p.tool, p.name, p.own, (*p.aliases, f"{tool}:{name}"))
            continue
        case, own = make_case(f"{tpl}/{tool}:{name}", wire)
        by_wire[wire] = Perm(case, tpl, tool, name, own)
    return list(by_wire.values())


PERMS = build()
TEMPLATES = ("CL.TE", "TE.CL", "TE.TE", "CL.0", "0.CL", "TE.TE+CL4")

# == running and checking ===============================================================================


def check_forwarded(perm: Perm, obs, up: Upstream, backend: Backend) -> None:
    """check_upstream of the corpus, except that the hidden request may travel as body bytes, and as the
    client's own pipelined request where the permuted line is legitimately not a framing field."""
    case = perm.case
    per_conn, tails = upstream_requests(up.received)
    for i, tail in enumerate(tails):
        assert b"smuggled" not in tail, f"upstream connection {i}: smuggled bytes outside any request: {tail!r}"
        if tail:
            assert i in backend.eof, f"upstream connection {i} left open with a partial request {tail[:100]!r}"
    got = [f for reqs in per_conn for f in reqs]
    for f in got:
        for n, v in f.headers:
            assert b"smuggled" not in n + v, f"smuggled bytes in a forwarded field {n!r}: {v!r}"
        if b"smuggled" in f.target:
            assert perm.own, f"{f.method!r} {f.target!r} reached the upstream as a request"
    want = list(case.outcomes[obs.status]) + ([NEXT] if obs.followed_up else []) + [CANARY]
    assert [(f.method, f.target) for f in got] == [(w.method, w.target) for w in want], "upstream requests"
    for f, w in zip(got, want):
        match(f, w)


async def run_one(perm: Perm, sem: asyncio.Semaphore) -> str | None:
    async with sem:
        backend = Backend()
        up = await Upstream(backend.handler).start()
        proxy = Proxy(parse_config(yaml.safe_dump(make_config(up.port, **BASE_CFG))))
        await proxy.start()
        try:
            obs = await drive(proxy.port, perm.case, WAIT)
            await settle(up, backend)
            try:
                check_client(perm.case, obs)
                check_forwarded(perm, obs, up, backend)
            except AssertionError as exc:
                return f"{perm.case.id} (also {', '.join(perm.aliases) or '-'}): {exc}\n    sent {perm.case.wire!r}"
            return None
        finally:
            await proxy.stop(drain_timeout=0.5)
            await up.close()


async def run_all(perms: list[Perm]) -> list[str]:
    sem = asyncio.Semaphore(PARALLEL)
    results = await asyncio.wait_for(asyncio.gather(*(run_one(p, sem) for p in perms)), 50)
    return [r for r in results if r]


@pytest.mark.parametrize("template", TEMPLATES)
async def test_permutations(template: str):
    perms = [p for p in PERMS if p.template == template]
    failures = await run_all(perms)
    assert not failures, f"{len(failures)} of {len(perms)} permutations failed:\n" + "\n".join(failures)


def test_oracle_agrees_with_the_rules_by_hand():
    """Spot checks of the oracle against http-rules.md, read by hand."""
    te = {name: rfc_view(templates_for_te(*burp(TE, b"chunked", name))["TE.TE"]) for name in BURP_TE}
    assert te["vanilla"].refuse == (400,)  # chunked twice
    alone = {name: rfc_view(request(b"POST", [burp(TE, b"chunked", name)[0]], TE_CL_BODY)) for name in TE_ONLY}
    assert alone["revdualchunk"].refuse == (501,) and alone["cowComma"].refuse == (501,)
    assert alone["dualchunk"].refuse == (400,) and alone["commaCow"].refuse == (400,)
    assert alone["quoted"].refuse == (400, 501) and alone["tabsuffix"].framing == "chunked"
    assert te["underjoin1"].framing == "chunked" and te["contentEnc"].framing == "chunked"
    for name in ("spacejoin1", "space1", "nameprefix1", "vertwrap", "spjunk", "backslash", "0dwrap", "badwrap",
                 "bodysplit", "accentTE", "0dsuffix", "tabwrap", "gareth1", "spacefix1:11", "prefix1:0"):
        assert te[name].refuse == (400,), name
    cl = {name: rfc_view(templates_for_cl(*burp(b"Content-Length", b"45", name))["CL.0"]) for name in BURP_CL}
    for name in ("vanilla", "nospace1", "valueprefix1", "multiCase", "UPPERCASE", "connection", "spacefix1:9"):
        assert (cl[name].framing, cl[name].body) == ("cl", SMUG), name
    assert cl["underjoin1"].framing == "none" and cl["underjoin1"].rest == SMUG
    assert cl["spaceFF"].refuse == (400,) and cl["prefix1:13"].refuse == (400,)


def test_permutation_counts():
    burp_names = {p.name for p in PERMS if p.tool == "burp"} | {
        a.split(":", 1)[1] for p in PERMS for a in p.aliases if a.startswith("burp:")}
    assert len(BURP_TE) == 57 and len(BURP_CL) == 36
    assert burp_names == set(BURP_TE), set(BURP_TE) - burp_names
    assert len(SMUGGLEX_TE) == 87 and len(SMUGGLEX_TE_TE) == 42
    assert len({p.case.id for p in PERMS}) == len(PERMS) >= 360
    assert all(p.template in TEMPLATES for p in PERMS)
