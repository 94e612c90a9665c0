#!/bin/sh
# In-guest virtio-fs workloads timed by the guest (virtiofs.guest.bench), busybox ash.
#
# Environment (kernel command line):
#   VIRTIOFS_TAG   device tag (default myfs)
#   BENCH_MIB      size of the sequential file in MiB (default 64)
#   BENCH_FILES    files for the metadata loops (default 2000)
#   BENCH_REPEAT   rounds inside this one boot (default 3)
#
# Output: "BENCH round name seconds count unit" per measurement, e.g.
#   BENCH 0 seq_write 0.412 64 MiB
# then "OK bench" (or "FAIL bench detail"). Times come from /proc/timer_list's "now at N nsecs"
# read with shell builtins (no fork, ~0.5 ms per reading under TCG); busybox date has no %N.
# Loops use builtins only (": >f", "[ -e f ]") so they time the file system, not fork+exec.

TAG=${VIRTIOFS_TAG:-myfs}
MNT=/mnt
MIB=${BENCH_MIB:-64}
FILES=${BENCH_FILES:-2000}
REPEAT=${BENCH_REPEAT:-3}

if [ -r /proc/timer_list ]; then
    clock() { { read -r _; read -r _; read -r _ _ T _; } </proc/timer_list; }
else
    clock() { read -r up _ </proc/uptime; T="${up%.*}${up#*.}0000000"; }
fi
# report ROUND NAME START_NS END_NS COUNT UNIT
report() {
    ns=$(($4 - $3))
    printf 'BENCH %s %s %d.%09d %s %s\n' "$1" "$2" $((ns / 1000000000)) $((ns % 1000000000)) "$5" "$6"
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
die() { echo "FAIL bench $*"; exit 1; }

mount -t virtiofs "$TAG" $MNT || die "mount -t virtiofs $TAG failed"
B=$MNT/bench
rm -rf $B
mkdir $B || die "mkdir $B"

r=0
while [ $r -lt $REPEAT ]; do
    drop_caches
    clock; a=$T
    dd if=/dev/zero of=$B/seq bs=1M count=$MIB conv=fsync 2>/dev/null || die "dd write"
    clock; b=$T
    report $r seq_write $a $b $MIB MiB
    drop_caches
    clock; a=$T
    dd if=$B/seq of=/dev/null bs=1M 2>/dev/null || die "dd read"
    clock; b=$T
    report $r seq_read $a $b $MIB MiB
    rm $B/seq

    mkdir $B/m || die "mkdir"
    clock; a=$T
    i=0
    while [ $i -lt $FILES ]; do
        : >$B/m/f$i || die "create f$i"
        i=$((i + 1))
    done
    clock; b=$T
    report $r create $a $b $FILES files
    drop_caches
    clock; a=$T
    i=0
    while [ $i -lt $FILES ]; do
        [ -e $B/m/f$i ] || die "stat f$i"
        i=$((i + 1))
    done
    clock; b=$T
    report $r stat_cold $a $b $FILES files
    clock; a=$T
    i=0
    while [ $i -lt $FILES ]; do
        [ -e $B/m/nx$i ] && die "nx$i exists"
        i=$((i + 1))
    done
    clock; b=$T
    report $r lookup_miss $a $b $FILES files
    drop_caches
    clock; a=$T
    ls -l $B/m >/dev/null || die "ls -l"
    clock; b=$T
    report $r ls_l_cold $a $b $FILES entries
    clock; a=$T
    rm -r $B/m || die "rm -r"
    clock; b=$T
    report $r rm_r $a $b $FILES files
    r=$((r + 1))
done
rmdir $B
cd /
umount $MNT || die "umount"
echo "OK bench"
