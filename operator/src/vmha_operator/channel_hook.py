#!/usr/bin/env python3
"""KubeVirt onDefineDomain hook: add the vmha virtio-serial channel to the libvirt domain.

KubeVirt's sidecar-shim runs this script as `onDefineDomain --vmi <VMI JSON> --domain <XML>`
and uses what it prints as the domain definition. The script adds

    <channel type='unix'>
      <source mode='bind' path='PATH'/>
      <target type='virtio' name='vmha.messaging'/>
    </channel>

with PATH from the VMI annotation vmha.io/channel-path (the operator sets it), and a
virtio-serial controller only when the domain has none. It never adds the channel twice.
The rest of the document is passed through byte for byte: the new elements are inserted as
text before `</devices>`, so namespaces and formatting that KubeVirt produced stay untouched.
If anything goes wrong it prints the domain unchanged (the VM still starts, without the
channel) and explains on stderr.

It runs inside the sidecar-shim image, whose interpreter is CentOS Stream 9's python3 (3.9):
standard library only, no syntax newer than 3.9. The operator stores this file in the
ConfigMap vmha-channel-hook; it is not imported by the operator.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

CHANNEL_NAME = "vmha.messaging"
CHANNEL_PATH_ANNOTATION = "vmha.io/channel-path"
DEFAULT_CHANNEL_PATH = "/var/run/kubevirt-private/vmha"
_DEVICES_END = re.compile(r"</devices\s*>")


def parse_args(argv: list[str]) -> tuple[str, str]:
    """The --vmi and --domain values (the shim passes them as separate arguments)."""
    values = {"--vmi": "", "--domain": ""}
    index = 0
    while index < len(argv):
        arg = argv[index]
        flag, sep, inline = arg.partition("=")
        if flag in values:
            if sep:
                values[flag] = inline
            elif index + 1 < len(argv):
                values[flag] = argv[index + 1]
                index += 1
        index += 1
    return values["--vmi"], values["--domain"]


def channel_path(vmi_json: str) -> str:
    """The socket path from the VMI's annotation, or the default."""
    try:
        vmi = json.loads(vmi_json) if vmi_json else {}
    except ValueError:
        return DEFAULT_CHANNEL_PATH
    annotations = (vmi.get("metadata") or {}).get("annotations") or {}
    path = annotations.get(CHANNEL_PATH_ANNOTATION) or DEFAULT_CHANNEL_PATH
    return str(path)


def has_vmha_channel(devices: ET.Element) -> bool:
    for channel in devices.findall("channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == CHANNEL_NAME:
            return True
    return False


def has_virtio_serial_controller(devices: ET.Element) -> bool:
    return any(c.get("type") == "virtio-serial" for c in devices.findall("controller"))


def channel_xml(path: str) -> str:
    return (
        "<channel type='unix'>"
        f"<source mode='bind' path={quoteattr(path)}/>"
        f"<target type='virtio' name='{CHANNEL_NAME}'/>"
        "</channel>"
    )


def add_channel(domain_xml: str, path: str) -> str:
    """The domain with the vmha channel (and a virtio-serial controller if needed)."""
    root = ET.fromstring(domain_xml)
    devices = root.find("devices")
    if devices is None:
        raise ValueError("the domain has no <devices> element")
    if has_vmha_channel(devices):
        return domain_xml
    addition = channel_xml(path)
    if not has_virtio_serial_controller(devices):
        addition = "<controller type='virtio-serial' index='0'/>" + addition
    ends = list(_DEVICES_END.finditer(domain_xml))
    if not ends:
        raise ValueError("<devices> is empty or self-closing; nothing to append to")
    cut = ends[-1].start()
    result = domain_xml[:cut] + addition + domain_xml[cut:]
    # Never hand back a document that does not parse or lacks the channel where it belongs.
    check = ET.fromstring(result).find("devices")
    if check is None or not has_vmha_channel(check):
        raise ValueError("the channel did not land in the domain's <devices>")
    return result


def main(argv: list[str]) -> int:
    vmi_json, domain_xml = parse_args(argv)
    if not domain_xml:
        sys.stderr.write("vmha channel hook: no --domain given\n")
        return 1
    try:
        result = add_channel(domain_xml, channel_path(vmi_json))
    except (ValueError, ET.ParseError) as error:
        sys.stderr.write(f"vmha channel hook: domain left unchanged: {error}\n")
        result = domain_xml
    sys.stdout.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
