"""The onDefineDomain hook script, run for real on libvirt domain XML as virt-launcher makes it.

The samples follow what KubeVirt's converter hands to hook sidecars (Go's encoding/xml
output: double quotes, explicit end tags, the kubevirt metadata namespace, a qemu namespace
declaration): a default VMI (virtio-serial controller + guest agent channel without a source
path, libvirt picks it), a VMI with autoattachSerialConsole false (no virtio-serial
controller), and a domain that already carries the vmha channel.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmha_operator import channel, channel_hook
from vmha_operator.api import CHANNEL_PATH_ANNOTATION

SCRIPT = Path(channel_hook.__file__)
VMI_UID = "9eae133d-5264-4040-9261-2ff5827e9540"

DEFAULT_DOMAIN = f"""<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
  <name>prod_web-1</name>
  <memory unit="b">2147483648</memory>
  <os>
    <type arch="x86_64" machine="q35">hvm</type>
    <smbios mode="sysinfo"></smbios>
  </os>
  <sysinfo type="smbios">
    <system>
      <entry name="uuid">b7a3c1f2-0c5e-5a9e-9f0e-6d1a2b3c4d5e</entry>
      <entry name="manufacturer">KubeVirt</entry>
      <entry name="family">KubeVirt</entry>
      <entry name="product">None</entry>
    </system>
    <bios></bios>
    <baseBoard></baseBoard>
    <chassis></chassis>
  </sysinfo>
  <devices>
    <emulator>/usr/libexec/qemu-kvm</emulator>
    <interface type="ethernet">
      <mac address="ca:5f:48:41:7d:5d"></mac>
      <target dev="tap0" managed="no"></target>
      <model type="virtio-non-transitional"></model>
      <mtu size="1450"></mtu>
      <alias name="ua-default"></alias>
      <rom enabled="no"></rom>
    </interface>
    <channel type="unix">
      <target name="org.qemu.guest_agent.0" type="virtio"></target>
    </channel>
    <controller type="usb" index="0" model="none"></controller>
    <controller type="scsi" index="0" model="virtio-non-transitional"></controller>
    <controller type="virtio-serial" index="0" model="virtio-non-transitional"></controller>
    <video>
      <model type="vga" heads="1" vram="16384"></model>
    </video>
    <graphics type="vnc">
      <listen type="socket" socket="/var/run/kubevirt-private/{VMI_UID}/virt-vnc"></listen>
    </graphics>
    <memballoon model="virtio-non-transitional">
      <stats period="10"></stats>
    </memballoon>
    <disk device="disk" type="file" model="virtio-non-transitional">
      <source file="/var/run/kubevirt-ephemeral-disks/disk-data/containerdisk/disk.qcow2"></source>
      <target bus="virtio" dev="vda"></target>
      <driver cache="none" error_policy="stop" name="qemu" type="qcow2" discard="unmap"></driver>
      <alias name="ua-containerdisk"></alias>
      <backingStore type="file">
        <format type="raw"></format>
        <source file="/var/run/kubevirt/container-disks/disk_0.img"></source>
      </backingStore>
    </disk>
    <serial type="unix">
      <target port="0"></target>
      <source mode="bind" path="/var/run/kubevirt-private/{VMI_UID}/virt-serial0"></source>
    </serial>
    <console type="pty">
      <target type="serial" port="0"></target>
    </console>
  </devices>
  <clock offset="utc"></clock>
  <resource>
    <partition>/machine</partition>
  </resource>
  <metadata>
    <kubevirt xmlns="http://kubevirt.io">
      <uid>{VMI_UID}</uid>
      <graceperiod>
        <deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>
      </graceperiod>
    </kubevirt>
  </metadata>
  <features>
    <acpi></acpi>
  </features>
  <cpu mode="host-model">
    <topology sockets="1" cores="1" threads="1"></topology>
  </cpu>
  <vcpu placement="static">1</vcpu>
</domain>"""

# autoattachSerialConsole: false → KubeVirt adds no virtio-serial controller and no serial.
NO_CONTROLLER_DOMAIN = (
    DEFAULT_DOMAIN.replace(
        '    <controller type="virtio-serial" index="0" model="virtio-non-transitional">'
        "</controller>\n",
        "",
    )
    .replace(
        f'    <serial type="unix">\n      <target port="0"></target>\n'
        f'      <source mode="bind" path="/var/run/kubevirt-private/{VMI_UID}/virt-serial0">'
        "</source>\n    </serial>\n",
        "",
    )
    .replace(
        '    <console type="pty">\n      <target type="serial" port="0"></target>\n'
        "    </console>\n",
        "",
    )
)

VMHA_CHANNEL = (
    '    <channel type="unix">\n'
    '      <source mode="bind" path="/var/run/kubevirt-private/vmha"></source>\n'
    '      <target name="vmha.messaging" type="virtio"></target>\n'
    "    </channel>\n"
)
ALREADY_WIRED_DOMAIN = DEFAULT_DOMAIN.replace(
    '    <controller type="usb"', VMHA_CHANNEL + '    <controller type="usb"'
)


def vmi_json(path: str | None = "/var/run/kubevirt-private/vmha") -> str:
    annotations = {CHANNEL_PATH_ANNOTATION: path} if path else {}
    return json.dumps(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                "name": "web-1",
                "namespace": "prod",
                "uid": VMI_UID,
                "annotations": annotations,
            },
            "spec": {"domain": {"devices": {}}},
        }
    )


def run_hook(domain: str, vmi: str | None = None) -> str:
    """Run the script as the sidecar-shim does: onDefineDomain --vmi JSON --domain XML."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--vmi", vmi or vmi_json(), "--domain", domain],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def vmha_channels(domain: str) -> list[ET.Element]:
    devices = ET.fromstring(domain).find("devices")
    assert devices is not None
    return [
        c
        for c in devices.findall("channel")
        if (t := c.find("target")) is not None and t.get("name") == "vmha.messaging"
    ]


def virtio_serial_controllers(domain: str) -> int:
    return len(ET.fromstring(domain).findall("./devices/controller[@type='virtio-serial']"))


def test_default_domain_gets_exactly_one_channel() -> None:
    out = run_hook(DEFAULT_DOMAIN)
    channels = vmha_channels(out)
    assert len(channels) == 1
    source = channels[0].find("source")
    target = channels[0].find("target")
    assert source is not None and target is not None
    assert source.attrib == {"mode": "bind", "path": "/var/run/kubevirt-private/vmha"}
    assert target.attrib == {"type": "virtio", "name": "vmha.messaging"}
    assert channels[0].get("type") == "unix"
    assert virtio_serial_controllers(out) == 1
    # The guest agent channel and everything else are untouched, byte for byte.
    assert out.replace(channel_hook.channel_xml("/var/run/kubevirt-private/vmha"), "") == (
        DEFAULT_DOMAIN
    )


def test_missing_controller_is_created_once() -> None:
    assert virtio_serial_controllers(NO_CONTROLLER_DOMAIN) == 0
    out = run_hook(NO_CONTROLLER_DOMAIN)
    assert virtio_serial_controllers(out) == 1
    assert len(vmha_channels(out)) == 1


def test_running_twice_adds_nothing() -> None:
    once = run_hook(NO_CONTROLLER_DOMAIN)
    assert run_hook(once) == once
    assert run_hook(ALREADY_WIRED_DOMAIN) == ALREADY_WIRED_DOMAIN
    assert len(vmha_channels(ALREADY_WIRED_DOMAIN)) == 1


def test_namespaced_metadata_survives() -> None:
    out = run_hook(DEFAULT_DOMAIN)
    root = ET.fromstring(out)
    uid = root.find("./metadata/{http://kubevirt.io}kubevirt/{http://kubevirt.io}uid")
    assert uid is not None and uid.text == VMI_UID
    assert 'xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0"' in out


def test_path_comes_from_the_vmi_annotation() -> None:
    out = run_hook(DEFAULT_DOMAIN, vmi_json('/var/run/kubevirt-private/other\'s "socket"'))
    source = vmha_channels(out)[0].find("source")
    assert source is not None
    assert source.get("path") == '/var/run/kubevirt-private/other\'s "socket"'
    default = run_hook(DEFAULT_DOMAIN, vmi_json(None))
    source = vmha_channels(default)[0].find("source")
    assert source is not None and source.get("path") == channel_hook.DEFAULT_CHANNEL_PATH


@pytest.mark.parametrize("broken", ["<domain><devices>", "<domain/>", "not xml at all"])
def test_unusable_input_passes_through_unchanged(broken: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--vmi", vmi_json(), "--domain", broken],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout == broken
    assert "domain left unchanged" in result.stderr


def test_missing_domain_argument_fails() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--vmi", vmi_json()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1


def test_script_runs_on_the_shim_images_python() -> None:
    """sidecar-shim ships CentOS Stream 9's python3 (3.9): no newer syntax allowed."""
    source = SCRIPT.read_text()
    ast.parse(source, feature_version=(3, 9))
    assert source.startswith("#!/usr/bin/env python3\n")
    imports = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert imports <= {"__future__", "json", "re", "sys", "xml"}


def test_configmap_carries_the_script() -> None:
    owners = [{"apiVersion": "vmha.io/v1alpha1", "kind": "VMGroup", "name": "g", "uid": "u"}]
    configmap = channel.hook_configmap("prod", owners)
    assert configmap["metadata"]["name"] == "vmha-channel-hook"
    assert configmap["metadata"]["ownerReferences"] == owners
    assert configmap["data"]["onDefineDomain"] == SCRIPT.read_text()
    assert CHANNEL_PATH_ANNOTATION == channel_hook.CHANNEL_PATH_ANNOTATION
