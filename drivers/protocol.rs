// SPDX-License-Identifier: GPL-2.0

//! Requests to the device and its responses (include-uapi/linux/virtio_mem.h).
//!
//! A response is untrusted: [`Response::parse`] accepts it only if the device wrote at
//! least the type field, no more than the response buffer, and a known type; an answer to
//! STATE ([`StateAnswer::decode`]) must also hold the whole `state` field and a known
//! state. Anything else leaves the device's state unknown.
//!
//! Plain `core` Rust: no kernel calls, so the same code can be tested on the host.

/// Request types (`VIRTIO_MEM_REQ_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub(crate) enum RequestType {
    Plug = 0,
    Unplug = 1,
    UnplugAll = 2,
    /// Asks whether a range is plugged; changes nothing. Sent only in a crash kernel.
    State = 3,
}

impl RequestType {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Plug => "PLUG",
            Self::Unplug => "UNPLUG",
            Self::UnplugAll => "UNPLUG_ALL",
            Self::State => "STATE",
        }
    }
}

/// Size of `struct virtio_mem_req`.
pub(crate) const REQUEST_SIZE: usize = 24;

/// A request as the device reads it: `struct virtio_mem_req`, little endian (virtio 1.0).
/// UNPLUG_ALL carries no address or count: pass 0 for both.
pub(crate) fn encode_request(ty: RequestType, addr: u64, nb_blocks: u16) -> [u8; REQUEST_SIZE] {
    let mut req = [0u8; REQUEST_SIZE];
    req[0..2].copy_from_slice(&(ty as u16).to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    req
}

/// The largest `nb_blocks` of one request (the field is 16 bits wide).
pub(crate) const MAX_BLOCKS_PER_REQUEST: u64 = u16::MAX as u64;

/// Size of `struct virtio_mem_resp`: what the device may write at most.
pub(crate) const RESPONSE_SIZE: u32 = 10;

/// The response buffer as it is handed to the device: every byte poisoned, so that a field
/// the device did not write (or an answer left over from an earlier request) reads as an
/// invalid type.
pub(crate) const RESPONSE_POISON: [u8; RESPONSE_SIZE as usize] = [0xff; RESPONSE_SIZE as usize];
/// Size of the response's `type` field: what the device must write at least.
const RESPONSE_TYPE_SIZE: u32 = 2;

/// A valid response (`VIRTIO_MEM_RESP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Response {
    /// Done.
    Ack,
    /// Refused for now (a plug beyond the requested size).
    Nack,
    /// Cannot be done right now; retry later.
    Busy,
    /// The request was invalid.
    Error,
}

/// Why a response was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BadResponse {
    /// The used length is outside `2..=10` bytes.
    Length(u32),
    /// The type is none of the known ones.
    Type(u16),
    /// An ACK to STATE whose used length (`2..10` bytes) does not reach its `state` field.
    NoState(u32),
    /// An ACK to STATE with a state none of the known ones.
    State(u16),
}

impl Response {
    /// Checks a raw response: `used_len` bytes written, `raw_type` in them.
    pub(crate) fn parse(raw_type: u16, used_len: u32) -> Result<Self, BadResponse> {
        if !(RESPONSE_TYPE_SIZE..=RESPONSE_SIZE).contains(&used_len) {
            return Err(BadResponse::Length(used_len));
        }
        match raw_type {
            0 => Ok(Self::Ack),
            1 => Ok(Self::Nack),
            2 => Ok(Self::Busy),
            3 => Ok(Self::Error),
            t => Err(BadResponse::Type(t)),
        }
    }

    /// Checks a response buffer (`struct virtio_mem_resp`, little endian) of which the
    /// device says it wrote `used_len` bytes.
    pub(crate) fn decode(
        buf: &[u8; RESPONSE_SIZE as usize],
        used_len: u32,
    ) -> Result<Self, BadResponse> {
        Self::parse(u16::from_le_bytes([buf[0], buf[1]]), used_len)
    }
}

/// Offset of `u.state.state` in `struct virtio_mem_resp` (after the type and 6 bytes of
/// padding).
const RESPONSE_STATE_OFFSET: usize = 8;

/// What the device says a range is (`VIRTIO_MEM_STATE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// Every device block of the range is plugged.
    Plugged,
    /// None is.
    Unplugged,
    /// Some are: never the answer for a single device block.
    Mixed,
}

/// A valid answer to STATE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateAnswer {
    /// ACK, with the state of the range.
    Ack(BlockState),
    /// Any other valid type: ERROR (an invalid request), or NACK and BUSY, which STATE
    /// cannot have. The caller decides what they mean.
    Other(Response),
}

impl StateAnswer {
    /// Checks the response buffer of a STATE request of which the device says it wrote
    /// `used_len` bytes: as [`Response::decode`], and an ACK must hold all 10 bytes and a
    /// known state.
    pub(crate) fn decode(
        buf: &[u8; RESPONSE_SIZE as usize],
        used_len: u32,
    ) -> Result<Self, BadResponse> {
        match Response::decode(buf, used_len)? {
            Response::Ack if used_len < RESPONSE_SIZE => Err(BadResponse::NoState(used_len)),
            Response::Ack => {
                let o = RESPONSE_STATE_OFFSET;
                match u16::from_le_bytes([buf[o], buf[o + 1]]) {
                    0 => Ok(Self::Ack(BlockState::Plugged)),
                    1 => Ok(Self::Ack(BlockState::Unplugged)),
                    2 => Ok(Self::Ack(BlockState::Mixed)),
                    s => Err(BadResponse::State(s)),
                }
            }
            other => Ok(Self::Other(other)),
        }
    }
}

/// Splits a run of `count` subblocks, each `blocks_per_sb` device blocks, into requests of
/// at most [`MAX_BLOCKS_PER_REQUEST`] device blocks that keep subblocks whole. Yields
/// (first subblock offset, subblocks) pairs.
pub(crate) fn split_run(count: usize, blocks_per_sb: u64) -> impl Iterator<Item = (usize, usize)> {
    let per_request = (MAX_BLOCKS_PER_REQUEST / blocks_per_sb.max(1)).max(1) as usize;
    (0..count)
        .step_by(per_request)
        .map(move |off| (off, per_request.min(count - off)))
}
