//! Encryption at rest: the `luks` node ([`LuksDisk`], serving a LUKS image decrypted), the
//! AES-256-XTS cipher its data path runs ([`xts`]), LUKS headers and keyslots ([`luks1`],
//! with the anti-forensic splitter in [`af`]), passphrases from key files ([`key_file`]),
//! and memory for key material that is locked against swap and zeroed after use
//! ([`secret`]).

pub mod af;
pub mod key_file;
pub mod luks1;
mod node;
pub mod secret;
pub mod xts;

use std::io;

pub use node::{LuksDisk, LuksQueue};

/// The one key size we implement: AES-256 in XTS mode takes two 256-bit keys.
pub const KEY_BYTES: usize = 64;

/// A disk's master key, in locked memory.
pub type MasterKey = secret::Locked<[u8; KEY_BYTES]>;

/// Why an encrypted image could not be read or made. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("not a LUKS image")]
    NotLuks,
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("damaged LUKS header: {0}")]
    Damaged(String),
    #[error("no keyslot opens with this passphrase")]
    WrongPassphrase,
    #[error(transparent)]
    Xts(#[from] xts::XtsError),
    #[error("{0}")]
    Io(io::Error),
}
