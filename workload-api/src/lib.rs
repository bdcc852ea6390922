//! The SPIFFE Workload API protocol as Tessera speaks it: the generated gRPC
//! code (committed under `src/gen`, checked for drift by a test), the security
//! header rule and the conversion of JWT claims to a protobuf `Struct`; and,
//! in [`sds`], the subset of Envoy's Secret Discovery Service v3 served on
//! the same socket.
//!
//! This crate knows nothing about attestation or certificates; the agent crate
//! implements the service trait.

#![forbid(unsafe_code)]

#[allow(clippy::all, missing_docs, rust_2018_idioms)]
mod generated {
    include!("gen/_.rs");
}

pub use generated::*;

/// Server-side types for implementing the Workload API.
pub mod server {
    pub use crate::generated::spiffe_workload_api_server::{
        SpiffeWorkloadApi, SpiffeWorkloadApiServer,
    };
}

/// Client-side types (used by the `tessera api` and `tessera healthcheck` CLI).
pub mod client {
    pub use crate::generated::spiffe_workload_api_client::SpiffeWorkloadApiClient;
}

/// Envoy's Secret Discovery Service v3: the generated messages (Envoy's
/// package paths, so `envoy::service::discovery::v3::DiscoveryRequest`), the
/// service, and the names and type URLs the protocol fixes.
pub mod sds {
    #[allow(clippy::all, missing_docs, rust_2018_idioms)]
    mod generated {
        include!("gen/envoy/_includes.rs");
    }

    pub use generated::*;

    pub use envoy::config::core::v3 as config_core;
    pub use envoy::extensions::transport_sockets::tls::v3 as tls;
    pub use envoy::service::discovery::v3 as discovery;

    /// Server-side types for implementing SDS.
    pub mod server {
        pub use super::envoy::service::secret::v3::secret_discovery_service_server::{
            SecretDiscoveryService, SecretDiscoveryServiceServer,
        };
    }

    /// Client-side types (tests and `tessera bench`).
    pub mod client {
        pub use super::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    }

    /// Fully-qualified gRPC service name.
    pub const SERVICE_NAME: &str = "envoy.service.secret.v3.SecretDiscoveryService";
    /// The one resource type SDS serves, in requests and responses.
    pub const SECRET_TYPE_URL: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// The `typed_config` type of Envoy's SPIFFE certificate validator.
    pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
    /// The extension name of Envoy's SPIFFE certificate validator.
    pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";

    /// The encoded `FileDescriptorSet` of the SDS protos, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/envoy/descriptor.bin");
}

/// The protobuf codec used by the generated code (`codec_path` in the drift
/// test): prost, with buffers sized for many long-lived streams. tonic keeps
/// a stream's encode buffer for the stream's whole life, and a buffer grown
/// by doubling pins up to twice the largest message; with thousands of idle
/// Workload API streams that dominated the agent's memory. So the encoder
/// reserves each message's exact length (the retained buffer is then one
/// message long), and the decoder starts at 1 KiB instead of tonic's 8 KiB.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::Status;
    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
    use tonic_prost::ProstCodec;

    /// Room for the 5-byte gRPC message header only: the body is reserved
    /// exactly, per message.
    const INITIAL_ENCODE_BUFFER: usize = 5;
    const INITIAL_DECODE_BUFFER: usize = 1024;
    const YIELD_THRESHOLD: usize = 32 * 1024;

    #[derive(Debug, Clone, Copy)]
    pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ExactEncoder<T>;
        type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

        fn encoder(&mut self) -> Self::Encoder {
            ExactEncoder(PhantomData)
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(
                INITIAL_DECODE_BUFFER,
                YIELD_THRESHOLD,
            ))
        }
    }

    /// Encodes a prost message after reserving exactly its encoded length.
    #[derive(Debug, Clone, Copy)]
    pub struct ExactEncoder<T>(PhantomData<T>);

    impl<T: prost::Message> Encoder for ExactEncoder<T> {
        type Item = T;
        type Error = Status;

        fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.reserve(item.encoded_len());
            item.encode(buf)
                .map_err(|e| Status::internal(format!("encoding the response: {e}")))
        }

        fn buffer_settings(&self) -> BufferSettings {
            BufferSettings::new(INITIAL_ENCODE_BUFFER, YIELD_THRESHOLD)
        }
    }
}

/// The encoded `FileDescriptorSet` of `workload.proto`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/workload_descriptor.bin");

/// Fully-qualified gRPC service name. There is no proto package on purpose.
pub const SERVICE_NAME: &str = "SpiffeWorkloadAPI";

/// The metadata key every Workload API request must carry with value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Checks the SPIFFE security header: exactly one value, exactly `true`
/// (case-sensitive). The spec requires InvalidArgument otherwise.
pub fn check_security_header(metadata: &tonic::metadata::MetadataMap) -> Result<(), tonic::Status> {
    let mut values = metadata.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(tonic::Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

/// Adds the security header to an outgoing client request.
pub fn with_security_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// Converts a JSON object (JWT claims) into a protobuf `Struct`.
/// JSON numbers become `f64`, as protobuf's `Value` only has doubles.
pub fn json_object_to_struct(
    object: &serde_json::Map<String, serde_json::Value>,
) -> prost_types::Struct {
    prost_types::Struct {
        fields: object
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_object_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_must_be_exactly_true() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(
            check_security_header(&md).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        md.insert(SECURITY_HEADER, "TRUE".parse().unwrap());
        assert!(check_security_header(&md).is_err());
        md.insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_security_header(&md).is_ok());
        md.append(SECURITY_HEADER, "true".parse().unwrap());
        assert!(
            check_security_header(&md).is_err(),
            "two values are rejected"
        );
    }

    /// The type URLs name messages the SDS protos really declare.
    #[test]
    fn sds_type_urls_name_declared_messages() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(sds::FILE_DESCRIPTOR_SET).unwrap();
        let mut declared = Vec::new();
        for file in &fds.file {
            for message in &file.message_type {
                declared.push(format!("{}.{}", file.package(), message.name()));
            }
        }
        for url in [sds::SECRET_TYPE_URL, sds::SPIFFE_VALIDATOR_TYPE_URL] {
            let name = url.strip_prefix("type.googleapis.com/").unwrap();
            assert!(declared.iter().any(|d| d == name), "{name} not declared");
        }
        let service = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect::<Vec<_>>();
        assert_eq!(service, [sds::SERVICE_NAME]);
    }

    #[test]
    fn claims_convert_to_struct() {
        let claims = serde_json::json!({"sub": "spiffe://td/a", "aud": ["x"], "exp": 5, "n": null});
        let s = json_object_to_struct(claims.as_object().unwrap());
        use prost_types::value::Kind;
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        assert!(
            matches!(s.fields["aud"].kind, Some(Kind::ListValue(ref l)) if l.values.len() == 1)
        );
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
    }
}
