//! What a panic does: logged with its thread's name, then the end of the process.

/// Exit code of a process ended by a panic where panics unwind (debug builds), as Rust's
/// own test harness uses.
const PANIC_EXIT_CODE: i32 = 101;

/// A panic in any thread is logged with the thread's name and ends the process: a worker or the
/// control thread that died quietly would leave a proxy that answers probes while it drops
/// traffic. Release builds abort after the hook (`panic = "abort"`); where panics unwind (debug
/// builds, tests) the hook exits itself, so nothing catches the panic and carries on.
pub(crate) fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let message = info.payload_as_str().unwrap_or("(no message)");
        let location = info
            .location()
            .map_or_else(String::new, |l| format!(" at {l}"));
        // Captured only when RUST_BACKTRACE asks, like the default hook.
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = match backtrace.status() {
            std::backtrace::BacktraceStatus::Captured => format!("\n{backtrace}"),
            _ => String::new(),
        };
        if log::log_enabled!(log::Level::Error) {
            log::error!("thread {name} panicked{location}: {message}; the process ends{backtrace}");
        } else {
            // Filtered off (`RUST_LOG=off`): a death still leaves its reason.
            eprintln!("udp-director: thread {name} panicked{location}: {message}{backtrace}");
        }
        if cfg!(panic = "unwind") {
            std::process::exit(PANIC_EXIT_CODE);
        }
    }));
}
