//! The training heap's thresholds, in a test binary of its own: the C library's statistics are
//! process-wide, and other tests in one process allocate and free large blocks meanwhile (which also moves
//! glibc's dynamic mmap threshold).

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn blocks_of_a_training_step_come_from_the_heap_and_stay_usable_after_the_trim() {
    use flywheel::heap::TrainingHeap;

    /// Bytes the C library holds in blocks mapped on their own.
    fn mapped() -> usize {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        unsafe { libc::mallinfo2() }.hblkhd
    }

    // The control, with glibc's defaults: a block this size is mapped on its own. It stays allocated,
    // since freeing a mapped block raises glibc's dynamic threshold and would make the check below pass
    // without the training heap.
    let before = mapped();
    let control = vec![1u8; 3 << 20];
    assert!(
        mapped() >= before + (3 << 20),
        "a 3 MiB block was not mapped on its own with the defaults"
    );

    let heap = TrainingHeap::enter();
    let before = mapped();
    let blocks: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 3 << 20]).collect();
    let during = mapped();
    assert!(
        during < before + (3 << 20),
        "24 MiB of blocks added {} mapped bytes",
        during.saturating_sub(before)
    );
    drop(blocks);
    drop(heap);
    let again: Vec<u8> = vec![7; 3 << 20];
    assert!(again.iter().all(|&b| b == 7));
    drop(control);
}
