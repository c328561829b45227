//! Reading files users name: only regular files. A FIFO blocks a reader forever and a device
//! such as /dev/zero never ends, so each is refused by name; a regular file is opened without
//! blocking and read to at most the size it had when opened.
use std::fs::{File, FileType};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// What a file that is not a regular one is, as a sentence names it.
pub fn kind(t: FileType) -> Option<&'static str> {
    Some(if t.is_file() {
        return None;
    } else if t.is_dir() {
        "a folder"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    })
}

/// Opens a regular file for reading; anything else is an error naming what it is.
pub fn open_regular(path: &Path) -> Result<File> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .at(path)?;
    if let Some(what) = kind(file.metadata().at(path)?.file_type()) {
        return Err(Error::Model {
            path: path.into(),
            msg: format!("is {what}, not a regular file"),
        });
    }
    Ok(file)
}

/// A regular file's bytes, at most its size when opened.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata().at(path)?.len();
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(len).read_to_end(&mut bytes).at(path)?;
    Ok(bytes)
}

/// A regular file's text (UTF-8).
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| Error::Model {
        path: path.into(),
        msg: "is not UTF-8 text".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_folders_and_fifos_are_refused_by_name() {
        let e = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/zero: is a character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_regular(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let fifo = dir.path().join("f");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("is a FIFO"), "{e}");
        std::fs::write(dir.path().join("r"), b"abc").unwrap();
        assert_eq!(read_regular(&dir.path().join("r")).unwrap(), b"abc");
    }
}
