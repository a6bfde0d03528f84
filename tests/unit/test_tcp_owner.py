"""hubd_client.tcp_owner: reading who serves the far end of a TCP connection from /proc/net/tcp and tcp6.

The parser is checked on lines in the kernel's own format (IPv4, IPv6, IPv4-mapped), the match on the server's
end of one connection (never the client's own end, never a closed socket's uid 0), and the whole on real
loopback connections of this process, whose far end it must find and attribute to this process's uid."""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hubd_client.paths import UntrustedSocket
from hubd_client.tcp_owner import (
    Address,
    TcpEntry,
    check_server,
    far_end_uid,
    parse_address,
    parse_line,
    server_uid,
    sockaddr,
)

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
LITTLE = sys.byteorder == "little"
MAPPED = b"\0" * 10 + b"\xff\xff"
LOOPBACK4 = MAPPED + bytes([127, 0, 0, 1])
LOOPBACK6 = b"\0" * 15 + b"\1"


def v4(text: str) -> str:
    """An IPv4 address as this host's kernel prints it: one 32-bit word in host byte order."""
    return f"{struct.unpack('=I', socket.inet_aton(text))[0]:08X}"


def v6(text: str) -> str:
    raw = socket.inet_pton(socket.AF_INET6, text)
    return "".join(f"{struct.unpack('=I', raw[i : i + 4])[0]:08X}" for i in range(0, 16, 4))


def line(local: str, remote: str, state: str, uid: int) -> str:
    return (
        f"   3: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:>5}        0 4242 1 "
        "0000000000000000 20 4 30 10 -1"
    )


@pytest.mark.skipif(not LITTLE, reason="the literal lines are a little-endian host's")
def test_an_ipv4_address_is_one_little_endian_word_and_a_port() -> None:
    assert parse_address("0100007F:1F90") == (LOOPBACK4, 8080)
    assert parse_address("00000000:0000") == (MAPPED + b"\0\0\0\0", 0)


@pytest.mark.skipif(not LITTLE, reason="the literal lines are a little-endian host's")
def test_an_ipv6_address_is_four_little_endian_words() -> None:
    assert parse_address("00000000000000000000000001000000:D431") == (LOOPBACK6, 54321)
    mapped = parse_address("0000000000000000FFFF00000100007F:0050")
    assert mapped == (LOOPBACK4, 80)  # ::ffff:127.0.0.1, as a dual-stack listener's connections are listed


@pytest.mark.skipif(not LITTLE, reason="the literal lines are a little-endian host's")
def test_a_kernel_line_gives_addresses_state_and_uid() -> None:
    text = (
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 11201176 1 "
        "00000000031b06de 100 0 0 10 0"
    )
    assert parse_line(text) == TcpEntry((LOOPBACK4, 8080), (MAPPED + b"\0\0\0\0", 0), 0x0A, 1001)
    text6 = (
        "   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C350 01 00000000:00000000 "
        "00:00000000 00000000   998        0 77 1 0000000000000000 20 4 30 10 -1"
    )
    assert parse_line(text6) == TcpEntry((LOOPBACK6, 8080), (LOOPBACK6, 50000), 0x01, 998)


def test_the_header_and_garbage_are_not_entries() -> None:
    assert parse_line(HEADER) is None
    assert parse_line("") is None
    assert parse_line("   0: nonsense:XYZ 00000000:0000 0A 0 0 0 0 0") is None
    with pytest.raises(ValueError):
        parse_address("7F00:1F90")


def test_the_server_end_is_the_entry_with_the_two_ends_swapped() -> None:
    client, server = ("127.0.0.1", 50000), ("127.0.0.1", 8080)
    lines = [
        HEADER,
        line(f"{v4('0.0.0.0')}:1F90", f"{v4('0.0.0.0')}:0000", "0A", 1001),  # a listener: not this connection
        line(f"{v4('127.0.0.1')}:C350", f"{v4('127.0.0.1')}:1F90", "01", 0),  # the client's own end
        line(f"{v4('127.0.0.1')}:1F90", f"{v4('127.0.0.1')}:C350", "01", 1001),  # the server's end
    ]
    assert far_end_uid(lines, sockaddr(client), sockaddr(server)) == 1001


def test_a_connection_not_accepted_yet_counts_as_its_listeners() -> None:
    lines = [line(f"{v4('127.0.0.1')}:1F90", f"{v4('127.0.0.1')}:C350", "03", 1001)]  # SYN_RECV
    assert far_end_uid(lines, sockaddr(("127.0.0.1", 50000)), sockaddr(("127.0.0.1", 8080))) == 1001


def test_a_closed_server_end_listed_as_uid_0_does_not_pass_for_root() -> None:
    for state in ("05", "06"):  # FIN_WAIT2 and TIME_WAIT minisockets are listed with uid 0
        lines = [line(f"{v4('127.0.0.1')}:1F90", f"{v4('127.0.0.1')}:C350", state, 0)]
        assert far_end_uid(lines, sockaddr(("127.0.0.1", 50000)), sockaddr(("127.0.0.1", 8080))) is None


def test_an_ipv4_client_finds_its_server_on_a_dual_stack_listener_in_tcp6() -> None:
    lines = [line(f"{v6('::ffff:127.0.0.1')}:1F90", f"{v6('::ffff:127.0.0.1')}:C350", "01", 1001)]
    assert far_end_uid(lines, sockaddr(("127.0.0.1", 50000)), sockaddr(("127.0.0.1", 8080))) == 1001


def test_ipv6_ends_match_with_flow_and_scope_in_the_socket_address() -> None:
    lines = [line(f"{v6('::1')}:1F90", f"{v6('::1')}:C350", "01", 1001)]
    client: Address = sockaddr(("::1", 50000, 0, 0))
    assert far_end_uid(lines, client, sockaddr(("::1", 8080, 0, 0))) == 1001
    assert far_end_uid(lines, client, sockaddr(("::1", 8081, 0, 0))) is None


@contextmanager
def connected(family: socket.AddressFamily, host: str, listen_host: str) -> Iterator[socket.socket]:
    """A real loopback connection of this process to a listener of this process."""
    listener = socket.socket(family)
    if family == socket.AF_INET6:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        listener.bind((listen_host, 0))
        listener.listen(1)
        with socket.create_connection((host, listener.getsockname()[1]), timeout=5) as client:
            yield client
    finally:
        listener.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="Linux's /proc/net/tcp")
@pytest.mark.parametrize(
    ("family", "host", "listen_host"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET, "127.0.0.1", "0.0.0.0"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "127.0.0.1", "::"),  # an IPv4 client of a dual-stack wildcard listener
    ],
)
def test_a_real_connection_is_served_by_this_process(
    family: socket.AddressFamily, host: str, listen_host: str
) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with connected(family, host, listen_host) as client:
        assert server_uid(client) == os.geteuid()
        check_server(client, client.getpeername()[1], {os.geteuid()})
        with pytest.raises(UntrustedSocket) as refused:
            check_server(client, client.getpeername()[1], {os.geteuid() + 1})
        assert (
            f"port {client.getpeername()[1]}" in str(refused.value) and "HUBD_SOCKET_OWNER" in refused.value.hint
        )


def test_a_server_this_namespace_does_not_list_is_refused(tmp_path: Path) -> None:
    """No /proc, or a daemon in another network namespace: nobody can say who serves the port, so nobody is
    trusted with the token, not even when every uid would be."""
    empty = tmp_path / "tcp"
    empty.write_text(HEADER + "\n")
    with connected(socket.AF_INET, "127.0.0.1", "127.0.0.1") as client:
        port = client.getpeername()[1]
        for tables in ([str(tmp_path / "no-such-table")], [str(empty)]):
            assert server_uid(client, tables) is None
            with pytest.raises(UntrustedSocket) as refused:
                check_server(client, port, {os.geteuid(), 0}, tables)
            assert f"port {port}" in str(refused.value) and "cannot be told" in str(refused.value)
