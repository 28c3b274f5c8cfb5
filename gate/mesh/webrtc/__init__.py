"""The WebRTC mesh transport (aiortc): flows to a peer gate as data channels of one RTCPeerConnection,
signalled over the HTTP/2 mTLS mesh. See gate.mesh.webrtc.dialer (dialling) and .answerer (serving)."""

__all__: list[str] = []
