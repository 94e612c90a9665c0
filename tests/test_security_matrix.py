"""SECURITY.md B6, measured: every checklist item maps to the tests that cover it, found by name.

The tests are collected from the source (``ast`` over ``tests/**/test_*.py``; fuzz targets are
``fuzz/fuzz_NAME.py`` run by ``tests/test_fuzz_smoke.py``), so the map cannot drift silently:

- an item with no test fails (``test_every_checklist_item_has_tests``);
- a selector that matches nothing fails (a renamed or deleted test, ``test_no_stale_selectors``);
- the checklist itself is read from SECURITY.md when it is there, and must have exactly the items
  mapped here (``test_map_follows_security_md``);
- an item only partly covered says what is missing in ``PARTIAL`` (a written reason, shown in
  the coverage table that ``test_print_coverage`` prints with ``pytest -s``).

Selectors: ``"FILE::REGEX"`` (a test function in ``tests/FILE`` whose name matches REGEX with
``re.search``) or ``"fuzz:NAME"`` (the fuzz target ``fuzz/fuzz_NAME.py``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SECURITY_MD = ROOT.parent / "shared" / "docs" / "SECURITY.md"

SEC = "test_passthrough_security.py"
MNT = "test_passthrough_mount.py"
SES = "test_session.py"
VUB = "test_vhost_user_backend.py"
SPL = "test_virtqueue_split.py"
PKD = "test_virtqueue_packed.py"
RES = "test_resource_bounds.py"

CHECKLIST: dict[int, tuple[str, list[str]]] = {
    1: ("Path escape", [
        f"{SEC}::hostile_names_are_refused_or_confined",
        f"{SEC}::dotdot_at_root_is_root",
        f"{SEC}::symlink_targets_are_never_followed",
        f"{SEC}::rename_and_link_stay_inside",
        f"{SEC}::raw_requests_with_hostile_names_through_the_session",
        f"{SEC}::directory_swapped_for_a_symlink_during_lookups",
        f"{MNT}::escapes_through_the_mount_go_nowhere",
        "test_serve_command.py::sandbox_confines|serve_process_root_is_confined",
        "fuzz:session",
    ]),
    2: ("Special files", [
        f"{SEC}::special_files_are_never_opened",
        f"{SEC}::raw_open_create_opendir_on_a_device_and_a_fifo",
        f"{SEC}::mknod_still_works_for_fifos_and_sockets_but_not_devices",
        f"{MNT}::special_files_in_the_share_are_not_opened_by_the_server",
    ]),
    3: ("Killpriv", [
        f"{SEC}::write_by_a_non_root_caller_clears_suid_sgid",
        f"{SEC}::write_kill_suidgid_flag",
        f"{SEC}::truncate_by_non_owner_and_with_fattr_kill_suidgid",
        f"{SEC}::chown_clears_suid_sgid",
        f"{SEC}::mapped_security_capability_is_dropped",
        f"{SEC}::mapped_capability_dropped_on_chown_of_o_path_only_files",
        f"{MNT}::non_owner_write_and_truncate_clear_suid_sgid",
        f"{MNT}::passthrough_write_drops_a_mapped_security_capability",
    ]),
    4: ("Credentials", [
        f"{SEC}::no_supplementary_groups_are_retained",
        f"{SEC}::setgid_directory_does_not_hand_out_root_group",
        f"{SEC}::created_files_have_the_callers_ids_and_umask",
        f"{SEC}::credentials_are_per_thread_under_concurrency",
        f"{MNT}::files_created_by_a_user_belong_to_it",
        f"{MNT}::setgid_root_directory_gives_no_setgid_root_file",
    ]),
    5: ("Xattr namespace mapping", [
        f"{SEC}::xattrmap_parses_virtiofsd_examples",
        f"{SEC}::xattrmap_trusted_to_user_prefix_hides_and_denies",
        f"{SEC}::xattrmap_security_prefix_and_unsupported",
        f"{SEC}::xattr_names_and_sizes_are_checked",
    ]),
    6: ("Untrusted ids", [
        f"{SEC}::unknown_node_ids_and_handles_answer_ebadf",
        f"{SEC}::file_handle_is_not_a_directory_handle",
        f"{SEC}::forget_saturates_and_ignores_unknown_ids",
        f"{SEC}::forget_racing_with_operations",
        f"{SEC}::batch_forget_count_mismatch",
        "fuzz:session",
    ]),
    7: ("Sizes", [
        f"{SES}::malformed_requests_get_one_error_reply",
        f"{SES}::name_without_nul_and_size_mismatch_are_einval",
        "test_protocol_fuzz.py::decoder_only_raises_protocol_error",
        "test_protocol_fuzz.py::trailing_bytes_after_the_arguments_are_refused",
        "test_virtqueue_chain.py::fuse_request_with_a_bad_len_is_refused",
        f"{RES}::write_claiming_1_gib|huge_read_size|huge_readdir_size",
        "fuzz:request", "fuzz:notify",
    ]),
    8: ("Liveness", [
        f"{SES}::any_request_gets_at_most_one_well_formed_reply",
        f"{SES}::malformed_no_reply_requests_are_dropped",
        f"{SES}::short_request_is_dropped",
        f"{VUB}::bad_chain_is_returned_with_len_0_and_the_queue_goes_on",
        f"{SPL}::bad_chain_head_is_returned_and_the_next_chain_served",
        f"{PKD}::bad_chain_id_is_returned_and_the_next_chain_served",
        "test_devfuse_robust.py::handler_failure_is_eio_and_the_server_goes_on",
        f"{RES}::frontend_dying|handler_exception",
        "fuzz:session", "fuzz:vhost_user",
    ]),
    9: ("Reply validity", [
        "test_protocol_validate.py::framing_rules|attr_with_invalid_type|new_entry_rules",
        f"{SES}::any_request_gets_at_most_one_well_formed_reply",
        "fuzz:session", "fuzz:reply", "fuzz:dirents",
    ]),
    10: ("Resource limits", [
        f"{SEC}::fd_exhaustion_answers_emfile_and_recovers",
        f"{MNT}::fd_exhaustion_answers_emfile_and_the_mount_lives",
        f"{SPL}::more_chains_in_flight_than_the_ring_holds_breaks_the_queue",
        f"{PKD}::more_chains_in_flight_than_the_ring_holds_breaks_the_queue",
        f"{RES}::flood|in_flight|stops_reading",
    ]),
    11: ("Virtqueue", [
        f"{SPL}::next_index_out_of_range_is_refused",
        f"{SPL}::descriptor_loop_is_detected",
        f"{SPL}::nested_indirect_is_refused",
        f"{SPL}::indirect_length_must_be_a_nonzero_multiple_of_16",
        f"{SPL}::indirect_table_over_65536_entries_is_refused",
        f"{SPL}::total_length_over_2_pow_32_is_refused",
        f"{SPL}::buffer_outside_guest_memory_is_refused",
        f"{SPL}::buffer_ending_on_the_last_byte_of_memory_is_accepted",
        f"{SPL}::descriptor_rewritten_after_pop_does_not_change_the_chain",
        f"{SPL}::avail_idx_more_than_size_ahead_breaks_the_queue",
        f"{SPL}::bad_ring_configuration_is_refused_at_setup",
        "test_virtqueue_memory.py::translate_sg_splits_across_adjacent_regions",
        "test_virtqueue_memory.py::u64_overflow_is_refused",
        "test_vhost_user_messages.py::region_overflows_are_refused",
        "test_virtqueue_fuzz.py::device_survives_any_ring",
        "fuzz:split_ring", "fuzz:packed_ring", "fuzz:vhost_user",
    ]),
    12: ("Driver side", [
        "test_client_hostile_device.py::forged_used_id|replayed_used_id",
        "test_client_hostile_device.py::over_reported_used_len",
        "test_client_hostile_device.py::wrong_unique|out_header_len_differs",
        f"{SPL}::driver_refuses_a_forged_used_id",
        f"{PKD}::driver_refuses_a_replayed_used_id",
        "test_virtqueue_fuzz.py::driver_survives_any_used_ring",
        "fuzz:split_ring", "fuzz:packed_ring", "fuzz:reply",
    ]),
    13: ("DAX", [
        "test_dax_window.py::hostile_map_is_rejected_with_nothing_mapped",
        "test_dax_window.py::hostile_unmap_is_rejected",
        "test_dax_window.py::unmap_whole_window_with_u64_max",
        "test_dax_window.py::any_op_sequence_keeps_bookkeeping_equal_to_the_kernel",
        "test_dax_e2e.py::hostile_setupmapping_maps_nothing",
    ]),
    14: ("Read-only mode", [
        f"{SEC}::readonly_refuses_every_modification",
        f"{MNT}::readonly_filesystem_refuses_writes_at_the_device",
    ]),
    15: ("Info leaks", [
        "test_protocol_roundtrip.py::padding_bytes_are_zero",
        "test_protocol_roundtrip.py::defaults_leave_reserved_fields_zero",
        "test_protocol_roundtrip.py::truncated_compat_reply_drops_the_tail",
        f"{RES}::stale",
    ]),
    16: ("Configuration injection", [
        "test_serve_command.py::o_options_parse_item_by_item",
        "test_serve_command.py::bad_options",
        "test_devfuse_mount.py::bad_mount_points_and_options_are_refused",
    ]),
    17: ("Queue protocol", [
        f"{SPL}::zero_length_descriptors_are_skipped",
        f"{SPL}::indirect_with_next_is_refused",
        f"{PKD}::indirect_with_next_is_refused",
        f"{VUB}::hiprio_forget_gets_no_reply_and_other_opcodes_are_refused",
        f"{SES}::requests_before_init_are_eio",
        f"{SPL}::a_broken_queue_pops_nothing",
        f"{VUB}::broken_ring_stops_its_queue",
    ]),
    18: ("FFI", [
        "test_dax_window.py::checked_access_refuses_unmapped_and_out_of_window",
        "test_dax_window.py::close_unmaps_everything_even_with_a_view_alive",
        "test_dax_window.py::finalizer_unmaps_a_dropped_window",
        "test_virtqueue_memory.py::remove_region_while_a_view_is_held",
        "test_dax_window.py::unmappable_fds_are_rejected",
    ]),
}

PARTIAL: dict[int, str] = {
    3: "sgid clearing on setxattr of a POSIX ACL (xfstests generic/375) is not tested: no test "
       "sets system.posix_acl_access; suid/sgid on write/truncate/chown and the mapped "
       "security.capability (incl. O_PATH-only files) are.",
    5: "the mapping rules are tested through PassthroughFS calls; listxattr hiding is tested "
       "for the prefix rules, not for every rule kind of virtiofsd's grammar (bad/unsupported "
       "with every flag combination).",
    10: "memory per connection is measured for a /dev/fuse request flood and a vhost-user "
        "back-end facing hostile chains (test_resource_bounds.py); no test measures several "
        "simultaneous vhost-user connections (the back-end serves one at a time by design).",
    15: "replies are checked for zeroed padding and exact lengths (every reply the session "
        "fuzz target produces is framed exactly: len == bytes written); stale bytes in a reused "
        "buffer are checked for the used ring only as far as used.len == out_header.len (the "
        "guest sees nothing past used.len), not by scanning guest memory after the reply.",
    18: "no test enumerates every ctypes/cffi call site; the mapping lifetimes and bounds "
        "behind the raw pointers (DAX window, guest memory regions) are tested, the raw "
        "syscall wrappers (openat2, setgroups, mount) only through their callers.",
}


def _collect() -> dict[str, set[str]]:
    """{test file name: test function names} for every tests/**/test_*.py."""
    out: dict[str, set[str]] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        try:
            tree = ast.parse(path.read_text(), filename=str(path))
        except SyntaxError:  # pragma: no cover - a file being edited; pytest reports it
            continue
        names = {n.name for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                 and n.name.startswith("test_")}
        out.setdefault(path.name, set()).update(names)
    return out


def _fuzz_targets() -> set[str]:
    return {p.stem[5:] for p in (ROOT / "fuzz").glob("fuzz_*.py")}


COLLECTED = _collect()
FUZZ = _fuzz_targets()


def matches(selector: str) -> list[str]:
    """Tests (``file::name``) a selector picks."""
    if selector.startswith("fuzz:"):
        name = selector[5:]
        smoke = "test_fuzz_target_runs_and_finds_nothing" in COLLECTED.get(
            "test_fuzz_smoke.py", set())
        return [f"fuzz/fuzz_{name}.py"] if name in FUZZ and smoke else []
    file, _, pattern = selector.partition("::")
    rx = re.compile(pattern)
    return sorted(f"{file}::{n}" for n in COLLECTED.get(file, set()) if rx.search(n))


@pytest.mark.parametrize("item", sorted(CHECKLIST), ids=lambda i: f"B6.{i}")
def test_every_checklist_item_has_tests(item: int) -> None:
    title, selectors = CHECKLIST[item]
    found = [t for s in selectors for t in matches(s)]
    assert found, f"B6 item {item} ({title}) has no test"


@pytest.mark.parametrize("item", sorted(CHECKLIST), ids=lambda i: f"B6.{i}")
def test_no_stale_selectors(item: int) -> None:
    title, selectors = CHECKLIST[item]
    stale = [s for s in selectors if not matches(s)]
    assert not stale, f"B6 item {item} ({title}): selectors matching no test: {stale}"


def test_partial_items_are_mapped_items_with_reasons() -> None:
    assert set(PARTIAL) <= set(CHECKLIST)
    assert all(len(reason) > 40 for reason in PARTIAL.values())


@pytest.mark.skipif(not SECURITY_MD.exists(), reason="shared/docs/SECURITY.md not beside the repo")
def test_map_follows_security_md() -> None:
    text = SECURITY_MD.read_text()
    section = text[text.index("## B6"):]
    items = {int(m.group(1)): m.group(2).strip()
             for m in re.finditer(r"^(\d+)\. ([^:\n]+)", section, re.M)}
    assert set(items) == set(CHECKLIST), sorted(set(items) ^ set(CHECKLIST))
    for number, title in items.items():
        mine = CHECKLIST[number][0].lower().split()[0]
        assert mine in title.lower() or title.lower().split()[0] in CHECKLIST[number][0].lower(), \
            (number, title, CHECKLIST[number][0])


def test_print_coverage() -> None:
    """The coverage table (``pytest -s tests/test_security_matrix.py::test_print_coverage``)."""
    lines = []
    for item, (title, selectors) in sorted(CHECKLIST.items()):
        found = sorted({t for s in selectors for t in matches(s)})
        state = "partial" if item in PARTIAL else "covered"
        lines.append(f"B6.{item:<2} {title:<26} {len(found):>3} tests  {state}")
        if item in PARTIAL:
            lines.append(f"       missing: {PARTIAL[item]}")
    print("\n".join(lines))
    assert len(lines) >= len(CHECKLIST)
