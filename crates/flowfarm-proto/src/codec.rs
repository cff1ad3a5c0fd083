//! The codec every generated client and server uses: prost's, except that a
//! message that cannot be decoded is INVALID_ARGUMENT.
//!
//! tonic answers an undecodable request (a string field that is not UTF-8,
//! a truncated field) with INTERNAL, which tells a client the server broke
//! and a retry may help; the request is at fault and a retry never helps.
//! The status names the field prost stopped at. Generated clients use the
//! same codec, so a response a client cannot decode reads INVALID_ARGUMENT
//! there too; its message says what could not be decoded.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::{ProstCodec, ProstEncoder};

/// prost encoding; undecodable messages are INVALID_ARGUMENT.
#[derive(Debug, Clone, Default)]
pub struct FlowfarmCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Codec for FlowfarmCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder { _type: PhantomData }
    }
}

/// Decodes `U`; a failure is the sender's fault.
#[derive(Debug, Clone, Default)]
pub struct CheckedDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("the message cannot be decoded ({e}); string fields must be valid UTF-8")))
    }
}
