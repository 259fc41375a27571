//! Compressed clusters: raw deflate (QEMU's "zlib" type: no zlib header) or zstd, as the
//! image header says. Only read: a compressed cluster written to is rewritten whole,
//! uncompressed, in a new cluster.

use std::io;

use super::header::Compression;

fn damaged(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Inflates `data` (a compressed cluster, perhaps with trailing bytes) into all of `out`.
pub fn inflate(kind: Compression, data: &[u8], out: &mut [u8]) -> io::Result<()> {
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            d.decompress(data, out, flate2::FlushDecompress::Finish)
                .map_err(|e| damaged(format!("a compressed cluster does not inflate: {e}")))?;
            if d.total_out() != out.len() as u64 {
                return Err(damaged(format!(
                    "a compressed cluster inflates to {} bytes, not {}",
                    d.total_out(),
                    out.len()
                )));
            }
            Ok(())
        }
        Compression::Zstd => {
            use std::io::Read;
            let mut src = data;
            let mut d = ruzstd::decoding::StreamingDecoder::new(&mut src)
                .map_err(|e| damaged(format!("a zstd-compressed cluster: {e}")))?;
            d.read_exact(out)
                .map_err(|e| damaged(format!("a zstd-compressed cluster: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_deflate_round_trips_and_damage_is_an_error() {
        let plain: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut packed = vec![0u8; 70000];
        c.compress(&plain, &mut packed, flate2::FlushCompress::Finish)
            .unwrap();
        packed.truncate(c.total_out() as usize);
        packed.extend_from_slice(&[0xaa; 300]); // the rest of its last sector
        let mut out = vec![0u8; 65536];
        inflate(Compression::Zlib, &packed, &mut out).unwrap();
        assert_eq!(out, plain);
        assert!(inflate(Compression::Zlib, &packed[..100], &mut out).is_err());
    }
}
