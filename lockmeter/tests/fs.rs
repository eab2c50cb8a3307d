//! File-system awareness: the mountinfo parser on real-world lines (and fuzzed), the
//! classification, and FileLock on real FUSE mounts.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use lockmeter::fs::{classify, find_mount, parse_mountinfo, parse_mountinfo_line, Coherence};
use lockmeter::{Error, FileLock, FsPolicy, LockKind};
use lockmeter_testkit::Bindfs;
use proptest::prelude::*;

const NFS4: &str = "36 25 0:45 / /mnt/shared rw,relatime shared:25 - nfs4 fileserver:/export/shared rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2";
const NFS4_LOCAL_ALL: &str = "37 25 0:46 / /mnt/k8s-pv rw,relatime shared:26 - nfs4 10.0.0.2:/pv rw,vers=4.1,hard,proto=tcp,local_lock=all,addr=10.0.0.2";
const NFS4_LOCAL_FLOCK: &str = "38 25 0:47 / /mnt/flocklocal rw,relatime - nfs4 srv:/x rw,vers=4.2,local_lock=flock,addr=10.0.0.2";
const NFS3_NOLOCK: &str = "39 25 0:48 / /mnt/legacy rw,relatime - nfs srv:/legacy rw,vers=3,nolock,proto=tcp,mountaddr=10.0.0.2,mountvers=3,local_lock=all,addr=10.0.0.2";
const CIFS: &str = "40 25 0:49 / /mnt/smb rw,relatime - cifs //nas/share rw,vers=3.1.1,cache=strict,username=svc,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.9,file_mode=0755,dir_mode=0755,soft,nounix,serverino,mapposix,rsize=4194304,wsize=4194304,bsize=1048576,echo_interval=60,actimeo=1";
const CIFS_NOBRL: &str =
    "41 25 0:50 / /mnt/smb2 rw,relatime - cifs //nas/other rw,vers=3.0,nobrl,addr=10.0.0.9";
const OVERLAY: &str = "42 1 0:51 / / rw,relatime master:1 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/ABC:/var/lib/docker/overlay2/l/DEF,upperdir=/var/lib/docker/overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work";
const SSHFS: &str = "43 25 0:52 / /home/me/remote rw,nosuid,nodev,relatime shared:30 - fuse.sshfs me@host:/srv rw,user_id=1000,group_id=1000";
const BINDFS: &str = "44 25 0:53 / /tmp/bf/a rw,nosuid,nodev,relatime - fuse /tmp/bf/src rw,user_id=0,group_id=0,default_permissions,allow_other";
const AUTOFS: &str = "45 25 0:54 / /net rw,relatime shared:31 - autofs /etc/auto.net rw,fd=11,pgrp=1,timeout=300,minproto=5,maxproto=5,indirect,pipe_ino=12345";
const EXT4_ESCAPED: &str = "46 25 8:17 / /mnt/my\\040disk\\011tab rw,noatime shared:2 master:3 propagate_from:4 - ext4 /dev/sdb1 rw,errors=remount-ro";
const TMPFS: &str = "47 25 0:55 / /dev/shm rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,size=65536k";

fn class(line: &str, kind: LockKind) -> Coherence {
    classify(&parse_mountinfo_line(line).unwrap(), kind).0
}

#[test]
fn real_world_lines_parse() {
    let m = parse_mountinfo_line(NFS4).unwrap();
    assert_eq!((m.mount_id, m.parent_id, m.major, m.minor), (36, 25, 0, 45));
    assert_eq!(m.fs_type, "nfs4");
    assert_eq!(m.source, "fileserver:/export/shared");
    assert_eq!(m.optional_fields, ["shared:25"]);
    assert_eq!(m.option("local_lock"), Some("none"));
    assert_eq!(m.option("vers"), Some("4.2"));

    let m = parse_mountinfo_line(EXT4_ESCAPED).unwrap();
    assert_eq!(m.mount_point, Path::new("/mnt/my disk\ttab"));
    assert_eq!(
        m.optional_fields,
        ["shared:2", "master:3", "propagate_from:4"]
    );
    assert_eq!(m.mount_options, ["rw", "noatime"]);

    let m = parse_mountinfo_line(SSHFS).unwrap();
    assert_eq!(m.fs_type, "fuse.sshfs");
    assert_eq!(m.source, "me@host:/srv");

    // The machine's own table parses completely.
    let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(parse_mountinfo(&own).len(), own.lines().count());
}

#[test]
fn classification_follows_the_kernel_facts() {
    use Coherence::*;
    assert_eq!(class(NFS4, LockKind::Flock), AcrossClients);
    assert_eq!(class(NFS4, LockKind::Posix), AcrossClients);
    assert_eq!(class(NFS4_LOCAL_ALL, LockKind::Flock), LocalOnly);
    assert_eq!(class(NFS4_LOCAL_ALL, LockKind::Ofd), LocalOnly);
    // local_lock=flock keeps flock local but still sends POSIX/OFD locks to the server.
    assert_eq!(class(NFS4_LOCAL_FLOCK, LockKind::Flock), LocalOnly);
    assert_eq!(class(NFS4_LOCAL_FLOCK, LockKind::Posix), AcrossClients);
    assert_eq!(class(NFS3_NOLOCK, LockKind::Posix), LocalOnly);
    assert_eq!(class(CIFS, LockKind::Flock), AcrossClients);
    assert_eq!(class(CIFS_NOBRL, LockKind::Flock), LocalOnly);
    assert_eq!(class(OVERLAY, LockKind::Flock), HostWide);
    assert_eq!(class(SSHFS, LockKind::Flock), LocalOnly);
    assert_eq!(class(BINDFS, LockKind::Flock), Unknown);
    assert_eq!(class(AUTOFS, LockKind::Flock), Unknown);
    assert_eq!(class(EXT4_ESCAPED, LockKind::Flock), HostWide);
    assert_eq!(class(TMPFS, LockKind::Flock), HostWide);
    // Reasons name the cause an operator can act on.
    let (_, reasons) = classify(
        &parse_mountinfo_line(NFS4_LOCAL_ALL).unwrap(),
        LockKind::Flock,
    );
    assert!(reasons[0].contains("local_lock=all"), "{reasons:?}");
    let (_, reasons) = classify(&parse_mountinfo_line(NFS4).unwrap(), LockKind::Flock);
    assert!(reasons.iter().any(|r| r.contains("lease")), "{reasons:?}");
}

#[test]
fn find_mount_takes_the_longest_covering_mount_on_top() {
    let table = [
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw",
        "2 1 0:40 / /mnt rw - tmpfs tmpfs rw",
        "3 2 0:41 / /mnt/shared rw - nfs4 a:/x rw,local_lock=none",
        "4 2 0:42 / /mnt/shared rw - nfs4 b:/y rw,local_lock=all",
    ]
    .join("\n");
    let mounts = parse_mountinfo(&table);
    let on = |p: &str| find_mount(&mounts, Path::new(p), None).unwrap().mount_id;
    assert_eq!(on("/etc/passwd"), 1);
    assert_eq!(on("/mnt/x.lock"), 2);
    assert_eq!(
        on("/mnt/shared/job.lock"),
        4,
        "the later mount shadows the earlier one"
    );
    assert_eq!(
        on("/mnt/sharedx/job.lock"),
        2,
        "prefix by path component, not string"
    );
    assert_eq!(
        find_mount(&mounts, Path::new("/mnt/shared/j"), Some((0, 41)))
            .unwrap()
            .mount_id,
        3
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parser_never_panics(line in ".{0,300}") {
        let _ = parse_mountinfo_line(&line);
        let _ = parse_mountinfo(&line);
    }

    #[test]
    fn parser_never_panics_on_near_valid_lines(
        fields in proptest::collection::vec("[ -~\\\\]{0,12}", 0..14),
    ) {
        let _ = parse_mountinfo_line(&fields.join(" "));
    }

    #[test]
    fn escaped_mount_points_round_trip(
        name in "[a-z \\t\\\\]{1,20}",
        id in 0u64..100000, major in 0u32..4096, minor in 0u32..1048576,
        opts in proptest::collection::vec("[a-z0-9_=]{1,8}", 1..5),
    ) {
        let escaped: String = name
            .chars()
            .map(|c| match c {
                ' ' => "\\040".to_owned(),
                '\t' => "\\011".to_owned(),
                '\\' => "\\134".to_owned(),
                c => c.to_string(),
            })
            .collect();
        let line = format!("{id} 1 {major}:{minor} / /mnt/{escaped} rw shared:1 - ext4 /dev/x {}", opts.join(","));
        let m = parse_mountinfo_line(&line).unwrap();
        prop_assert_eq!(m.mount_point, Path::new("/mnt").join(&name));
        prop_assert_eq!((m.mount_id, m.major, m.minor), (id, major, minor));
        prop_assert_eq!(m.super_options, opts);
    }
}

#[test]
fn filelock_on_fuse_reports_the_mount_and_can_refuse() {
    let Some(bf) = Bindfs::new(&[]) else { return };
    let path = bf.a().join("job.lock");
    let lock = FileLock::open(&path).unwrap(); // default policy: warn, then open
    let info = lock.fs_info();
    assert_eq!(info.fs_type, "fuse");
    assert_eq!(lock.fs_type(), "fuse");
    assert_eq!(info.coherence, Coherence::Unknown);
    assert_eq!(info.mount.as_ref().unwrap().mount_point, bf.a());
    assert!(info.reasons[0].contains("per mount"), "{:?}", info.reasons);
    let e = FileLock::builder(&path)
        .fs_policy(FsPolicy::Refuse)
        .open()
        .unwrap_err();
    assert!(matches!(e, Error::UntrustedFileSystem { .. }), "{e}");
    assert_eq!(e.errno_name(), "ENOLCK");
    assert!(FileLock::builder(&path)
        .fs_policy(FsPolicy::Allow)
        .open()
        .is_ok());

    let local = tempfile::tempdir_in("/dev/shm").unwrap();
    let lock = FileLock::builder(local.path().join("x.lock"))
        .fs_policy(FsPolicy::Refuse)
        .open()
        .unwrap();
    assert_eq!(lock.fs_info().coherence, Coherence::HostWide);
    assert_eq!(lock.fs_type(), "tmpfs");
}
