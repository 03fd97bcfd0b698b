//! FIFREEZE with a hard deadline. A frozen filesystem stops a VM's
//! writes, so a freeze is held only while reflinks are taken, a watchdog
//! thaws it when the deadline passes whatever the caller is doing, and
//! only filesystems this driver froze are ever thawed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::error::{CoreError, CoreResult, IoContext};

nix::ioctl_readwrite_bad!(fifreeze, 0xC004_5877, libc::c_int);
nix::ioctl_readwrite_bad!(fithaw, 0xC004_5878, libc::c_int);

/// Thaws the filesystem of an open directory. EINVAL: it was not frozen.
pub fn thaw(dir: &File) -> nix::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW on a directory of the filesystem.
    unsafe { fithaw(dir.as_raw_fd(), &mut arg) }.map(drop)
}

struct Held {
    frozen: Mutex<Vec<(PathBuf, File)>>,
    expired: AtomicBool,
}

impl Held {
    fn thaw_all(&self) {
        let mut frozen = self.frozen.lock().unwrap();
        for (path, dir) in frozen.drain(..).rev() {
            match thaw(&dir) {
                Ok(()) => tracing::info!(mount = %path.display(), "filesystem thawed"),
                Err(e) => {
                    tracing::error!(mount = %path.display(), error = %e, "cannot thaw filesystem")
                }
            }
        }
    }
}

/// Filesystems frozen by this driver: thawed on drop, or by the watchdog
/// at the deadline, whichever comes first.
pub struct Freeze {
    held: Arc<Held>,
    stop: Option<mpsc::Sender<()>>,
}

impl Freeze {
    /// Starts a freeze window that ends by itself after `deadline`.
    pub fn start(deadline: Duration) -> Freeze {
        let held = Arc::new(Held {
            frozen: Mutex::new(Vec::new()),
            expired: AtomicBool::new(false),
        });
        let (stop, wait) = mpsc::channel::<()>();
        let watched = held.clone();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(deadline) {
                watched.expired.store(true, Ordering::SeqCst);
                tracing::error!(
                    ?deadline,
                    "a group snapshot held filesystems frozen past its deadline; thawing them"
                );
                watched.thaw_all();
            }
        });
        Freeze {
            held,
            stop: Some(stop),
        }
    }

    /// Freezes the filesystem mounted at `mount_point`. One someone else
    /// froze (EBUSY) is refused: they may thaw it at any moment.
    pub fn freeze(&self, mount_point: &Path) -> CoreResult<()> {
        let dir = File::open(mount_point).context(|| format!("open {}", mount_point.display()))?;
        let mut frozen = self.held.frozen.lock().unwrap();
        if self.expired() {
            return Err(self.expired_error());
        }
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE on a directory of the mounted filesystem.
        match unsafe { fifreeze(dir.as_raw_fd(), &mut arg) } {
            Ok(_) => {
                tracing::info!(mount = %mount_point.display(), "filesystem frozen");
                frozen.push((mount_point.to_path_buf(), dir));
                Ok(())
            }
            Err(nix::errno::Errno::EBUSY) => Err(CoreError::NotPossibleHere(format!(
                "the filesystem at {} is already frozen by someone else; a consistent group snapshot cannot be taken now",
                mount_point.display()
            ))),
            Err(e) => Err(CoreError::io(format!("FIFREEZE {}", mount_point.display()), e.into())),
        }
    }

    pub fn expired(&self) -> bool {
        self.held.expired.load(Ordering::SeqCst)
    }

    pub fn expired_error(&self) -> CoreError {
        CoreError::Internal(
            "the freeze deadline passed before the group's members were taken; the filesystems were thawed and the group snapshot was not taken".into(),
        )
    }

    /// Thaws everything now; true when the deadline had already passed.
    pub fn end(mut self) -> bool {
        self.finish();
        self.expired()
    }

    fn finish(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.held.thaw_all();
    }
}

impl Drop for Freeze {
    fn drop(&mut self) {
        self.finish();
    }
}
