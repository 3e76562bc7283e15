//! The heap: the program's own malloc, as the library's C callers expect
//! (glibc's malloc is also safe between fork and exec).

use core::alloc::{GlobalAlloc, Layout};

struct Malloc;

// SAFETY: malloc and posix_memalign return memory aligned as asked (the
// fundamental alignment, or `align` for posix_memalign), free takes what
// either returned.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MIN_ALIGN && layout.align() <= layout.size() {
            // SAFETY: any size may be asked of malloc.
            unsafe { libc::malloc(layout.size()).cast() }
        } else {
            let mut p = core::ptr::null_mut();
            let align = layout.align().max(core::mem::size_of::<usize>());
            // SAFETY: `align` is a power of two and a multiple of the
            // pointer size, as posix_memalign requires.
            let rc = unsafe { libc::posix_memalign(&mut p, align, layout.size()) };
            if rc == 0 {
                p.cast()
            } else {
                core::ptr::null_mut()
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above.
        unsafe { libc::free(ptr.cast()) }
    }
}

/// What malloc guarantees on x86-64 and aarch64 glibc.
const MIN_ALIGN: usize = 16;

#[global_allocator]
static HEAP: Malloc = Malloc;
