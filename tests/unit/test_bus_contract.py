"""The D-Bus contract file: it parses, documents every member and error, and the code declares it.

`normalised()` is also what the integration test holds the served introspection to.
"""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import introspection as intr
from uplinkd.errors import UplinkdError
from uplinkd.publish import bus, bus_api
from uplinkd.publish.status import LinkStatus, Overall, Snapshot

CONTRACT = Path(__file__).resolve().parents[2] / "dbus" / "org.uplinkd.Uplinkd1.xml"

# Documentation carried as annotations is not part of what a client calls.
DOC_ANNOTATIONS = frozenset(
    {"org.freedesktop.DBus.DocString", "org.gtk.GDBus.DocString", "org.gtk.GDBus.DocString.Short"}
)
# What every exported object serves whatever the contract says (dbus-fast adds them).
ALWAYS_SERVED = frozenset(
    {
        "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Peer",
        "org.freedesktop.DBus.Properties",
    }
)


def _annotations(element: ET.Element) -> dict[str, str | None]:
    return {
        str(a.get("name")): a.get("value")
        for a in element.findall("annotation")
        if a.get("name") not in DOC_ANNOTATIONS
    }


def _method_arg(arg: ET.Element) -> tuple[str, str | None, str | None]:
    direction = arg.get("direction", "in")
    # dbus-fast names in-arguments after the Python parameters (so they are compared) and serves
    # return values and signal arguments unnamed: those names are documentation.
    return direction, arg.get("type"), arg.get("name") if direction == "in" else None


def normalised(xml_text: str) -> dict[str, Any]:
    """Interface name -> what a client can call, read and receive, with the annotations that
    change behaviour. Whitespace, comments, doc annotations, member order and the names of
    return values and signal arguments do not count."""
    interfaces: dict[str, Any] = {}
    for iface in ET.fromstring(xml_text).findall("interface"):  # noqa: S314 (ours, not foreign)
        interfaces[str(iface.get("name"))] = {
            "annotations": _annotations(iface),
            "methods": {
                m.get("name"): ([_method_arg(a) for a in m.findall("arg")], _annotations(m))
                for m in iface.findall("method")
            },
            "signals": {
                s.get("name"): ([a.get("type") for a in s.findall("arg")], _annotations(s))
                for s in iface.findall("signal")
            },
            "properties": {
                p.get("name"): (p.get("type"), p.get("access"), _annotations(p))
                for p in iface.findall("property")
            },
        }
    return interfaces


def served_view(xml_text: str, *, link_object: bool = False) -> dict[str, Any]:
    """An object's introspection as the contract describes it. dbus-fast serves
    org.freedesktop.DBus.ObjectManager on every object; the contract puts it on the manager."""
    ignored = ALWAYS_SERVED | ({bus_api.OBJECT_MANAGER_INTERFACE} if link_object else set())
    return {name: v for name, v in normalised(xml_text).items() if name not in ignored}


def contract(*names: str) -> dict[str, Any]:
    interfaces = normalised(CONTRACT.read_text())
    return {name: interfaces[name] for name in names}


def _documented_elements() -> list[tuple[ET.Element, ET.Element | None]]:
    """(element, the comment just before it) for every interface, method, signal, property."""
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # noqa: S314 (our file)
    root = ET.fromstring(CONTRACT.read_text(), parser)  # noqa: S314
    found = []
    for parent in [root, *root.findall("interface")]:
        previous = None
        for child in parent:
            if child.tag in ("interface", "method", "signal", "property"):
                found.append((child, previous))
            previous = child if child.tag is ET.Comment else None
    return found


def test_contract_parses_as_introspection() -> None:
    node = intr.Node.parse(CONTRACT.read_text())
    assert {iface.name for iface in node.interfaces} == {
        bus_api.MANAGER_INTERFACE,
        bus_api.LINK_INTERFACE,
        bus_api.OBJECT_MANAGER_INTERFACE,
    }


def test_every_member_and_argument_is_documented() -> None:
    elements = _documented_elements()
    assert len(elements) == 3 + 6 + 2 + 5 + 14 + 3  # interfaces, Manager, Link, ObjectManager
    for element, comment in elements:
        name = element.get("name")
        assert comment is not None, f"{element.tag} {name} has no comment before it"
        text = str(comment.text)
        assert text.strip().startswith(f"{name}:"), f"{name}: the comment must start with it"
        prose = [line for line in text.splitlines()[1:] if line.strip() and "@" not in line]
        assert prose, f"{element.tag} {name}: no sentence on what it means"
        for arg in element.findall("arg"):
            assert re.search(rf"@{arg.get('name')}: \S", text), f"{name}: @{arg.get('name')}"


def test_every_error_is_documented() -> None:
    text = CONTRACT.read_text()
    for error in bus_api.ErrorName:
        assert re.search(rf"^\s+{re.escape(error.value)}\s+\w", text, re.M), error.value
    named = set(re.findall(r"org\.uplinkd\.Uplinkd1\.Error\.\w+", text))
    assert named == {error.value for error in bus_api.ErrorName}


def _status(name: str) -> LinkStatus:
    return LinkStatus(name, "wan1", "up", 1.5, True, 1, 1, "", "", -1.0, 7.5, 0.0, 0, 0, 0.5)


def test_the_code_declares_the_contract() -> None:
    """Without a bus: what dbus-fast will serve, from the annotations, is the contract."""
    snapshot = Snapshot("0", "weighted", 0, Overall.ONLINE, (_status("ISP1"),))
    manager = bus_api.ManagerInterface(bus.BusService(controller=None), snapshot)
    served = [manager.introspect(), bus_api.LinkInterface(_status("ISP1")).introspect()]
    xml = intr.Node("/", interfaces=served).tostring()
    assert normalised(xml) == contract(bus_api.MANAGER_INTERFACE, bus_api.LINK_INTERFACE)


def test_published_values_have_the_declared_types() -> None:
    link = bus_api.LinkInterface(_status("ISP1"))
    variants = link.variants()
    assert {name: v.signature for name, v in variants.items()} == {
        name: prop[0]
        for name, prop in contract(bus_api.LINK_INTERFACE)[bus_api.LINK_INTERFACE][
            "properties"
        ].items()
    }
    assert variants["Since"].value == 1
    assert variants["LatencyMs"].value == -1.0


def test_manager_publishes_the_hook_problems() -> None:
    """HookProblems carries the snapshot's hook failures, one string each, as the contract's
    type; no problem is an empty list (GetStatus returns these same variants)."""
    problems = ("/etc/uplinkd/firewall/10.web.py:2: syntax error: invalid syntax", "x:1: exit 1")
    snapshot = Snapshot("0", "weighted", 0, Overall.ONLINE, (), hook_problems=problems)
    manager = bus_api.ManagerInterface(bus.BusService(controller=None), snapshot)
    variants = manager.variants()
    assert {name: v.signature for name, v in variants.items()} == {
        name: prop[0]
        for name, prop in contract(bus_api.MANAGER_INTERFACE)[bus_api.MANAGER_INTERFACE][
            "properties"
        ].items()
    }
    assert variants["HookProblems"].value == list(problems)
    none = Snapshot("0", "weighted", 0, Overall.ONLINE, ())
    assert (
        bus_api.ManagerInterface(bus.BusService(controller=None), none)
        .variants()["HookProblems"]
        .value
        == []
    )


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("ISP1", "ISP1"),
        ("dsl-2", "dsl_2d2"),
        ("my_isp", "my_5fisp"),  # "_" is escaped too, so "my-isp" and "my_isp" differ
        ("4g", "_34g"),  # a digit first is escaped, like systemd
        ("0", "_30"),
        ("", "_"),
        ("_", "_5f"),
        ("a b/c.d", "a_20b_2fc_2ed"),
        ("Ünï", "_c3_9cn_c3_af"),  # non-ASCII: each UTF-8 byte
    ],
)
def test_object_path_label(name: str, label: str) -> None:
    assert bus_api.object_path_label(name) == label
    assert re.fullmatch(r"[A-Za-z0-9_]+", label)
    assert bus_api.link_path(name) == f"/org/uplinkd/Uplinkd1/link/{label}"


def test_object_path_labels_never_collide() -> None:
    names = ["a-b", "a_b", "a_2db", "a_5fb", "ab", "a.b", "", "_", "1", "_31", "x1", "x_31"]
    labels = [bus_api.object_path_label(name) for name in names]
    assert len(set(labels)) == len(names)
    for label in labels:
        intr.Node.parse(f'<node name="/org/x/{label}"/>')  # a valid object path element


def test_start_without_a_bus_is_a_clear_error(tmp_path: Path) -> None:
    service = bus.BusService(controller=None)
    address = f"unix:path={tmp_path}/no-bus-here"
    with pytest.raises(UplinkdError, match=f"cannot connect to {address}: .*No such file"):
        asyncio.run(service.start(address))
    assert not service.started
