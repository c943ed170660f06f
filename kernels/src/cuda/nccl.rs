//! NCCL transfer of bytes between two GPU processes (feature `cuda`): the device-to-device
//! path of KV migration between two GPU workers on one node. The exporter makes a unique
//! id ([`new_id`]) and hands it to the puller over gRPC; both then join a two-rank
//! communicator (exporter rank 0, puller rank 1) and one NCCL send / receive moves the
//! bytes, over NVLink or PCIe peer to peer where the node has them.
//!
//! NCCL (`libnccl.so.2`) is loaded at run time like the driver; [`nccl_available`] says
//! whether it can be. Joining a communicator blocks until the peer joins, so callers run
//! these functions on a blocking thread and bound them with a timeout.

use super::device::drv;
use crate::error::{KernelError, Result};
use cudarc::driver::CudaContext;
use cudarc::nccl::{Comm, Id};
use std::sync::Arc;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// Whether the NCCL library can be loaded.
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

fn nccl(what: &'static str) -> impl Fn(cudarc::nccl::result::NcclError) -> KernelError {
    move |e| KernelError::Device(format!("NCCL {what}: {e:?}"))
}

/// A new unique id for a two-rank communicator, as bytes to send to the peer.
pub fn new_id() -> Result<Vec<u8>> {
    if !nccl_available() {
        return Err(KernelError::Device("the NCCL library (libnccl.so.2) could not be loaded".to_string()));
    }
    let id = Id::new().map_err(nccl("unique id"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The id `bytes` came from ([`new_id`]); an error unless there are exactly
/// [`ID_BYTES`].
fn id_from(bytes: &[u8]) -> Result<Id> {
    let arr: [u8; ID_BYTES] = bytes
        .try_into()
        .map_err(|_| KernelError::Config(format!("an NCCL unique id has {ID_BYTES} bytes, not {}", bytes.len())))?;
    Ok(Id::uninit(arr.map(|b| b as std::ffi::c_char)))
}

/// Joins the communicator of `id` as `rank` of 2 on a new stream of `ctx`.
fn join(ctx: &Arc<CudaContext>, id: &[u8], rank: usize) -> Result<Comm> {
    let id = id_from(id)?;
    ctx.bind_to_thread().map_err(drv("binding the CUDA context"))?;
    let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
    Comm::from_rank(stream, rank, 2, id).map_err(nccl("joining the communicator"))
}

/// Rank 0: sends `bytes` to rank 1 of the communicator `id` (blocks until rank 1 joined
/// and the send completed).
pub fn send_bytes(ctx: &Arc<CudaContext>, id: &[u8], bytes: &[u8]) -> Result<()> {
    let comm = join(ctx, id, 0)?;
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = comm.stream();
    let buf = stream.clone_htod(bytes).map_err(drv("host-to-device copy"))?;
    comm.send(&buf, 1).map_err(nccl("send"))?;
    stream.synchronize().map_err(drv("waiting for the NCCL send"))
}

/// Rank 1: receives `n` bytes from rank 0 of the communicator `id`.
pub fn recv_bytes(ctx: &Arc<CudaContext>, id: &[u8], n: usize) -> Result<Vec<u8>> {
    let comm = join(ctx, id, 1)?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let stream = comm.stream();
    let mut buf = stream.alloc_zeros::<u8>(n).map_err(drv("device allocation"))?;
    comm.recv(&mut buf, 0).map_err(nccl("receive"))?;
    let out = stream.clone_dtoh(&buf).map_err(drv("device-to-host copy"))?;
    stream.synchronize().map_err(drv("waiting for the NCCL receive"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_have_128_bytes_and_a_missing_library_is_a_clear_error() {
        assert!(id_from(&[7u8; ID_BYTES]).is_ok());
        let e = id_from(&[7u8; 12]).unwrap_err().to_string();
        assert!(e.contains("128 bytes, not 12"), "{e}");
        match new_id() {
            Ok(id) => assert_eq!(id.len(), ID_BYTES),
            Err(e) => {
                assert!(!nccl_available());
                assert!(e.to_string().contains("libnccl.so.2"), "{e}");
            }
        }
    }
}
