//! NCCL on machines without it must fail cleanly (no panic, a reason); the
//! `#[ignore]`d test runs world size 1 on a real GPU (`--ignored`).

use dalle_collective::{
    Collective, Error, NcclCollective, nccl_available, nccl_probe, nccl_unique_id,
};

fn has_gpu() -> bool {
    std::env::var_os("DALLE_TEST_GPU").is_some()
}

#[test]
fn without_cuda_nccl_is_unavailable_and_construction_fails_cleanly() {
    if has_gpu() {
        return;
    }
    assert!(!nccl_available());
    let reason = nccl_probe().unwrap_err();
    assert!(matches!(reason, Error::NcclUnavailable(_)), "{reason}");
    assert!(matches!(nccl_unique_id(), Err(Error::NcclUnavailable(_))));
    let err = NcclCollective::new(0, 1, &[0u8; 128], 0)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::NcclUnavailable(_)), "{err}");
    eprintln!("{err}");
}

#[test]
fn bad_ranks_are_refused_before_touching_cuda() {
    let err = NcclCollective::new(2, 2, &[0u8; 128], 0)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, Error::Setup(_)), "{err}");
}

/// World size 1 on GPU 0: the communicator forms from a fresh unique id,
/// and every collective runs (and is the identity) on host and device data.
#[test]
#[ignore = "needs a GPU, libcuda and libnccl (set DALLE_TEST_GPU=1)"]
fn world_of_one_on_a_gpu() {
    nccl_probe().expect("NCCL usable");
    let id = nccl_unique_id().unwrap();
    let mut nccl = NcclCollective::new(0, 1, &id, 0).unwrap();
    assert_eq!((nccl.rank(), nccl.world_size()), (0, 1));

    let mut host: Vec<f32> = (0..1_000_003).map(|i| i as f32 * 0.5).collect();
    let want = host.clone();
    nccl.all_reduce_sum(&mut host).unwrap();
    assert_eq!(host, want);
    let mut bytes: Vec<u8> = (0..100_001).map(|i| i as u8).collect();
    let want_bytes = bytes.clone();
    nccl.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(bytes, want_bytes);
    nccl.barrier().unwrap();

    // Device path: a 25 MB bucket, reduced many times over, timed.
    let stream = nccl.stream().clone();
    let n = 25 << 18; // 6.5M f32 = 25 MiB
    let mut bucket = stream.clone_htod(&vec![1.25f32; n]).unwrap();
    let reps = 20;
    let started = std::time::Instant::now();
    for _ in 0..reps {
        nccl.all_reduce_sum_device(&mut bucket).unwrap();
    }
    let per = started.elapsed() / reps;
    let back = stream.clone_dtoh(&bucket).unwrap();
    assert!(back.iter().all(|&v| v == 1.25));
    eprintln!("NCCL world 1: 25 MiB all-reduce {per:?} per call (including the watchdog)");
    assert!(matches!(
        nccl.broadcast(&mut [0u8; 4], 1),
        Err(Error::InvalidArgument { .. })
    ));
}

/// World size 1 on GPU 0: the sharded collectives (one grouped NCCL call
/// per shard) run on host and device data, and with one rank, whose shard
/// is everything, both are the identity, bitwise.
#[test]
#[ignore = "needs a GPU, libcuda and libnccl (set DALLE_TEST_GPU=1)"]
fn sharded_collectives_in_a_world_of_one_on_a_gpu() {
    use cudarc::driver::DevicePtrMut;
    use dalle_collective::shard_range;

    nccl_probe().expect("NCCL usable");
    let id = nccl_unique_id().unwrap();
    let mut nccl = NcclCollective::new(0, 1, &id, 0).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for len in [0usize, 1, 7, 1000, 1_000_003] {
        assert_eq!(shard_range(len, 1, 0), 0..len);
        let want: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();

        let mut host = want.clone();
        nccl.reduce_scatter_sum(&mut host).unwrap();
        assert_eq!(bits(&host), bits(&want), "n={len}: host reduce-scatter");
        nccl.all_gather(&mut host).unwrap();
        assert_eq!(bits(&host), bits(&want), "n={len}: host all-gather");

        if len == 0 {
            continue;
        }
        let stream = nccl.stream().clone();
        let mut dev = stream.clone_htod(&want).unwrap();
        nccl.reduce_scatter_sum_device(&mut dev).unwrap();
        nccl.all_gather_device(&mut dev).unwrap();
        assert_eq!(bits(&stream.clone_dtoh(&dev).unwrap()), bits(&want));
        {
            let (ptr, _record) = dev.device_ptr_mut(&stream);
            // SAFETY: `ptr` addresses `len` f32 of `dev`, borrowed until
            // `_record` drops.
            unsafe {
                nccl.reduce_scatter_sum_raw(ptr, len).unwrap();
                nccl.all_gather_raw(ptr, len).unwrap();
            }
        }
        assert_eq!(bits(&stream.clone_dtoh(&dev).unwrap()), bits(&want));
    }
    nccl.barrier().unwrap();
}
