// Package interop checks the Tessera agent with an independent client,
// go-spiffe v2, over the real Workload API socket.
//
// Run through run.sh (or ../agent.sh), which starts a fresh agent and
// exports SPIFFE_ENDPOINT_SOCKET, TESSERA_EXPECTED_ID and
// TESSERA_TRUST_DOMAIN. A missing variable fails the test; nothing is skipped.
package interop

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	// callTimeout bounds every Workload API call and every wait.
	callTimeout = 10 * time.Second
	audience    = "interop-aud"
	hint        = "interop"
	// agent.sh configures x509_ttl = "6s" and jwt_ttl = "2m".
	x509TTL    = 6 * time.Second
	jwtTTL     = 2 * time.Minute
	clockSlack = 2 * time.Second
)

func mustEnv(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run this suite through tests/interop/go/run.sh (or tests/interop/agent.sh)", name)
	}
	return v
}

func expectedID(t *testing.T) spiffeid.ID {
	t.Helper()
	mustEnv(t, "SPIFFE_ENDPOINT_SOCKET")
	id, err := spiffeid.FromString(mustEnv(t, "TESSERA_EXPECTED_ID"))
	if err != nil {
		t.Fatalf("TESSERA_EXPECTED_ID: %v", err)
	}
	td, err := spiffeid.TrustDomainFromString(mustEnv(t, "TESSERA_TRUST_DOMAIN"))
	if err != nil {
		t.Fatalf("TESSERA_TRUST_DOMAIN: %v", err)
	}
	if id.TrustDomain() != td {
		t.Fatalf("TESSERA_EXPECTED_ID %s is not in TESSERA_TRUST_DOMAIN %s", id, td)
	}
	return id
}

func timeout(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	t.Cleanup(cancel)
	return ctx
}

// checkX509SVID checks an X509-SVID on the certificate itself.
func checkX509SVID(t *testing.T, svid *x509svid.SVID, id spiffeid.ID) {
	t.Helper()
	if svid.ID != id {
		t.Fatalf("X509-SVID ID = %s, want %s", svid.ID, id)
	}
	if len(svid.Certificates) == 0 {
		t.Fatal("X509-SVID has no certificates")
	}
	leaf := svid.Certificates[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Fatalf("leaf URI SANs = %v, want exactly [%s]", leaf.URIs, id)
	}
	if len(leaf.DNSNames)+len(leaf.EmailAddresses)+len(leaf.IPAddresses) != 0 {
		t.Fatalf("leaf has extra SANs: dns=%v email=%v ip=%v", leaf.DNSNames, leaf.EmailAddresses, leaf.IPAddresses)
	}
	if leaf.IsCA {
		t.Fatal("leaf is a CA")
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		t.Fatalf("leaf key usage %b lacks digitalSignature", leaf.KeyUsage)
	}
	if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		t.Fatalf("leaf key usage %b has keyCertSign/cRLSign", leaf.KeyUsage)
	}
	pub, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		t.Fatal("private key does not match the leaf certificate")
	}
	now := time.Now()
	if leaf.NotBefore.After(now.Add(clockSlack)) {
		t.Fatalf("leaf NotBefore %s is in the future (now %s)", leaf.NotBefore, now)
	}
	if !leaf.NotAfter.After(now) || leaf.NotAfter.After(now.Add(x509TTL+clockSlack)) {
		t.Fatalf("leaf NotAfter %s outside (now, now+%s] (now %s)", leaf.NotAfter, x509TTL, now)
	}
}

func checkVerifies(t *testing.T, svid *x509svid.SVID, bundles x509bundle.Source, id spiffeid.ID) {
	t.Helper()
	got, chains, err := x509svid.Verify(svid.Certificates, bundles)
	if err != nil {
		t.Fatalf("X509-SVID does not verify against the bundle: %v", err)
	}
	if got != id || len(chains) == 0 {
		t.Fatalf("verified ID = %s (%d chains), want %s", got, len(chains), id)
	}
}

func TestFetchX509SVID(t *testing.T) {
	id := expectedID(t)
	svid, err := workloadapi.FetchX509SVID(timeout(t))
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	checkX509SVID(t, svid, id)
	if svid.Hint != hint {
		t.Fatalf("hint = %q, want %q", svid.Hint, hint)
	}
}

func TestFetchX509Context(t *testing.T) {
	id := expectedID(t)
	xc, err := workloadapi.FetchX509Context(timeout(t))
	if err != nil {
		t.Fatalf("FetchX509Context: %v", err)
	}
	if len(xc.SVIDs) != 1 {
		t.Fatalf("got %d X509-SVIDs, want 1", len(xc.SVIDs))
	}
	checkX509SVID(t, xc.SVIDs[0], id)
	if _, ok := xc.Bundles.Get(id.TrustDomain()); !ok {
		t.Fatalf("own trust domain %s missing from the X.509 context", id.TrustDomain())
	}
	checkVerifies(t, xc.SVIDs[0], xc.Bundles, id)
}

func TestFetchX509Bundles(t *testing.T) {
	id := expectedID(t)
	ctx := timeout(t)
	set, err := workloadapi.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	b, ok := set.Get(id.TrustDomain())
	if !ok {
		t.Fatalf("own trust domain %s missing from %d bundles", id.TrustDomain(), set.Len())
	}
	if len(b.X509Authorities()) == 0 {
		t.Fatal("X.509 bundle has no authorities")
	}
	for _, ca := range b.X509Authorities() {
		if !ca.IsCA || ca.KeyUsage&x509.KeyUsageCertSign == 0 {
			t.Fatalf("bundle authority %s is not a CA (IsCA=%v, KeyUsage=%b)", ca.Subject, ca.IsCA, ca.KeyUsage)
		}
	}
	svid, err := workloadapi.FetchX509SVID(ctx)
	if err != nil {
		t.Fatalf("FetchX509SVID: %v", err)
	}
	checkVerifies(t, svid, set, id)
}

func TestFetchJWTBundles(t *testing.T) {
	id := expectedID(t)
	set, err := workloadapi.FetchJWTBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	b, ok := set.Get(id.TrustDomain())
	if !ok {
		t.Fatalf("own trust domain %s missing from %d JWT bundles", id.TrustDomain(), set.Len())
	}
	if len(b.JWTAuthorities()) == 0 {
		t.Fatal("JWT bundle has no authorities")
	}
	for kid := range b.JWTAuthorities() {
		if kid == "" {
			t.Fatal("JWT authority with empty key ID")
		}
	}
}

func TestFetchJWTSVIDAndValidateOffline(t *testing.T) {
	id := expectedID(t)
	ctx := timeout(t)
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if svid.ID != id {
		t.Fatalf("JWT-SVID ID = %s, want %s", svid.ID, id)
	}
	if svid.Hint != hint {
		t.Fatalf("JWT-SVID hint = %q, want %q", svid.Hint, hint)
	}
	token := svid.Marshal()

	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	rawHeader, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		t.Fatalf("header encoding: %v", err)
	}
	var header struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
		Typ string `json:"typ"`
	}
	if err := json.Unmarshal(rawHeader, &header); err != nil {
		t.Fatalf("header JSON: %v", err)
	}
	// agent.sh's authority.jwt_key_type: RS256 with an RSA type (run.sh
	// runs the JWT tests that way too), else ES256.
	wantAlg := "ES256"
	if strings.HasPrefix(os.Getenv("TESSERA_JWT_KEY_TYPE"), "rsa-") {
		wantAlg = "RS256"
	}
	if header.Alg != wantAlg || header.Kid == "" {
		t.Fatalf("header = %s, want alg %s and a kid", rawHeader, wantAlg)
	}
	if header.Typ != "" && header.Typ != "JWT" && header.Typ != "JOSE" {
		t.Fatalf("header typ = %q", header.Typ)
	}

	bundles, err := workloadapi.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	parsed, err := jwtsvid.ParseAndValidate(token, bundles, []string{audience})
	if err != nil {
		t.Fatalf("ParseAndValidate: %v", err)
	}
	if parsed.ID != id {
		t.Fatalf("validated ID = %s, want %s", parsed.ID, id)
	}
	if len(parsed.Audience) != 1 || parsed.Audience[0] != audience {
		t.Fatalf("audience = %v, want [%s]", parsed.Audience, audience)
	}
	now := time.Now()
	if !parsed.Expiry.After(now) || parsed.Expiry.After(now.Add(jwtTTL+clockSlack)) {
		t.Fatalf("expiry %s outside (now, now+%s]", parsed.Expiry, jwtTTL)
	}
	if sub, _ := parsed.Claims["sub"].(string); sub != id.String() {
		t.Fatalf("sub claim = %v", parsed.Claims["sub"])
	}

	// The offline validation is not vacuous.
	if _, err := jwtsvid.ParseAndValidate(token, bundles, []string{"someone-else"}); err == nil {
		t.Fatal("ParseAndValidate accepted a foreign audience")
	}
	sig := []byte(parts[2])
	if sig[0] == 'A' {
		sig[0] = 'B'
	} else {
		sig[0] = 'A'
	}
	forged := parts[0] + "." + parts[1] + "." + string(sig)
	if _, err := jwtsvid.ParseAndValidate(forged, bundles, []string{audience}); err == nil {
		t.Fatal("ParseAndValidate accepted a forged signature")
	}
	empty := jwtbundle.NewSet()
	if _, err := jwtsvid.ParseAndValidate(token, empty, []string{audience}); err == nil {
		t.Fatal("ParseAndValidate accepted a token without a bundle")
	}
}

func TestValidateJWTSVIDThroughAgent(t *testing.T) {
	id := expectedID(t)
	ctx := timeout(t)
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	got, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), audience)
	if err != nil {
		t.Fatalf("ValidateJWTSVID(good audience): %v", err)
	}
	if got.ID != id {
		t.Fatalf("validated ID = %s, want %s", got.ID, id)
	}
	if _, err := workloadapi.ValidateJWTSVID(ctx, svid.Marshal(), "wrong-aud"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("ValidateJWTSVID(wrong audience) = %v, want InvalidArgument", err)
	}
}

type rotationWatcher struct {
	updates chan *workloadapi.X509Context
	errs    chan error
}

func (w *rotationWatcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	select {
	case w.updates <- c:
	default:
	}
}

func (w *rotationWatcher) OnX509ContextWatchError(err error) {
	if status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
		return
	}
	select {
	case w.errs <- err:
	default:
	}
}

func TestWatchX509ContextSeesRotation(t *testing.T) {
	id := expectedID(t)
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout+5*time.Second)
	defer cancel()
	w := &rotationWatcher{updates: make(chan *workloadapi.X509Context, 16), errs: make(chan error, 16)}
	done := make(chan error, 1)
	go func() { done <- workloadapi.WatchX509Context(ctx, w) }()

	deadline := time.After(callTimeout)
	var first *x509svid.SVID
	var firstAt time.Time
	for {
		select {
		case c := <-w.updates:
			if len(c.SVIDs) != 1 {
				t.Fatalf("update with %d SVIDs", len(c.SVIDs))
			}
			svid := c.SVIDs[0]
			checkX509SVID(t, svid, id)
			checkVerifies(t, svid, c.Bundles, id)
			if first == nil {
				first, firstAt = svid, time.Now()
				continue
			}
			if svid.Certificates[0].SerialNumber.Cmp(first.Certificates[0].SerialNumber) == 0 {
				continue
			}
			if !svid.Certificates[0].NotAfter.After(first.Certificates[0].NotAfter) {
				t.Fatalf("rotated NotAfter %s not after %s", svid.Certificates[0].NotAfter, first.Certificates[0].NotAfter)
			}
			if waited := time.Since(firstAt); waited >= x509TTL {
				t.Fatalf("rotation took %s, not before the %s TTL ran out", waited, x509TTL)
			}
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) && status.Code(err) != codes.Canceled {
					t.Fatalf("WatchX509Context returned %v after cancel", err)
				}
			case <-time.After(callTimeout):
				t.Fatal("WatchX509Context did not return after cancel")
			}
			return
		case err := <-w.errs:
			t.Fatalf("watch error: %v", err)
		case err := <-done:
			t.Fatalf("WatchX509Context returned early: %v", err)
		case <-deadline:
			if first == nil {
				t.Fatalf("no X.509 context within %s", callTimeout)
			}
			t.Fatalf("no rotated X509-SVID within %s (serial %s)", callTimeout, first.Certificates[0].SerialNumber)
		}
	}
}

// mtlsExchange runs one server and one client workload, each with its own
// X509Source, and exchanges one message over mutual TLS.
func mtlsExchange(t *testing.T, serverAuthorizes, clientAuthorizes spiffeid.ID) (reply []byte, serverSawClient, clientSawServer spiffeid.ID, dialErr error) {
	t.Helper()
	ctx := timeout(t)
	serverSrc, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		t.Fatalf("NewX509Source(server): %v", err)
	}
	defer serverSrc.Close()
	clientSrc, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		t.Fatalf("NewX509Source(client): %v", err)
	}
	defer clientSrc.Close()

	ln, err := spiffetls.ListenWithMode(ctx, "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithSource(tlsconfig.AuthorizeID(serverAuthorizes), serverSrc))
	if err != nil {
		t.Fatalf("ListenWithMode: %v", err)
	}
	defer ln.Close()

	type result struct {
		peer spiffeid.ID
		msg  []byte
		err  error
	}
	served := make(chan result, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			served <- result{err: err}
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(callTimeout))
		buf := make([]byte, 256)
		n, err := conn.Read(buf) // completes the handshake first
		if err != nil {
			served <- result{err: err}
			return
		}
		peer, err := spiffetls.PeerIDFromConn(conn)
		if err != nil {
			served <- result{err: err}
			return
		}
		if _, err := conn.Write(append([]byte("pong:"), buf[:n]...)); err != nil {
			served <- result{err: err}
			return
		}
		served <- result{peer: peer, msg: buf[:n]}
	}()

	conn, err := spiffetls.DialWithMode(ctx, "tcp", ln.Addr().String(),
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeID(clientAuthorizes), clientSrc))
	if err != nil {
		return nil, spiffeid.ID{}, spiffeid.ID{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(callTimeout))
	if clientSawServer, err = spiffetls.PeerIDFromConn(conn); err != nil {
		t.Fatalf("client PeerIDFromConn: %v", err)
	}
	if _, err := conn.Write([]byte("hello from client")); err != nil {
		t.Fatalf("client write: %v", err)
	}
	reply, err = io.ReadAll(io.LimitReader(conn, 256))
	if err != nil {
		t.Fatalf("client read: %v", err)
	}
	select {
	case r := <-served:
		if r.err != nil {
			t.Fatalf("server: %v", r.err)
		}
		if !bytes.Equal(r.msg, []byte("hello from client")) {
			t.Fatalf("server received %q", r.msg)
		}
		serverSawClient = r.peer
	case <-time.After(callTimeout):
		t.Fatal("server did not finish")
	}
	return reply, serverSawClient, clientSawServer, nil
}

func TestMTLSBetweenTwoWorkloads(t *testing.T) {
	id := expectedID(t)
	reply, serverSawClient, clientSawServer, err := mtlsExchange(t, id, id)
	if err != nil {
		t.Fatalf("DialWithMode: %v", err)
	}
	if string(reply) != "pong:hello from client" {
		t.Fatalf("reply = %q", reply)
	}
	if serverSawClient != id || clientSawServer != id {
		t.Fatalf("peer IDs: server saw %s, client saw %s, want %s", serverSawClient, clientSawServer, id)
	}
}

func TestMTLSRejectsUnexpectedServerID(t *testing.T) {
	id := expectedID(t)
	other := spiffeid.RequireFromPath(id.TrustDomain(), "/not-the-server")
	if _, _, _, err := mtlsExchange(t, id, other); err == nil {
		t.Fatalf("dial authorizing %s succeeded against a server holding %s", other, id)
	}
}

// rawClient is a plain gRPC client on the agent socket: no header is added.
func rawClient(t *testing.T) workload.SpiffeWorkloadAPIClient {
	t.Helper()
	addr := mustEnv(t, "SPIFFE_ENDPOINT_SOCKET")
	path := strings.TrimPrefix(addr, "unix://")
	if path == addr || !strings.HasPrefix(path, "/") {
		t.Fatalf("SPIFFE_ENDPOINT_SOCKET %q is not unix:///path", addr)
	}
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient: %v", err)
	}
	t.Cleanup(func() { conn.Close() })
	return workload.NewSpiffeWorkloadAPIClient(conn)
}

func withHeader(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")
}

func TestRawFetchJWTSVIDRequestChecks(t *testing.T) {
	id := expectedID(t)
	c := rawClient(t)
	ctx := timeout(t)

	// Positive control on the same connection.
	resp, err := c.FetchJWTSVID(withHeader(ctx), &workload.JWTSVIDRequest{Audience: []string{audience}})
	if err != nil {
		t.Fatalf("FetchJWTSVID with header: %v", err)
	}
	if len(resp.Svids) != 1 || resp.Svids[0].SpiffeId != id.String() {
		t.Fatalf("FetchJWTSVID response: %v", resp)
	}

	if _, err := c.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{audience}}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID without header = %v, want InvalidArgument", err)
	}
	if _, err := c.FetchJWTSVID(withHeader(ctx), &workload.JWTSVIDRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchJWTSVID with empty audience = %v, want InvalidArgument", err)
	}
}

func TestRawFetchX509SVIDWithoutHeader(t *testing.T) {
	expectedID(t)
	c := rawClient(t)
	stream, err := c.FetchX509SVID(timeout(t), &workload.X509SVIDRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchX509SVID without header = %v, want InvalidArgument", err)
	}
}

func TestRawBundleMapsKeyedByTrustDomainID(t *testing.T) {
	id := expectedID(t)
	c := rawClient(t)
	ctx, cancel := context.WithTimeout(withHeader(context.Background()), callTimeout)
	defer cancel()
	want := id.TrustDomain().IDString()

	xs, err := c.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
	if err != nil {
		t.Fatalf("FetchX509Bundles: %v", err)
	}
	xr, err := xs.Recv()
	if err != nil {
		t.Fatalf("FetchX509Bundles recv: %v", err)
	}
	if _, ok := xr.Bundles[want]; !ok || len(xr.Bundles) != 1 {
		t.Fatalf("X.509 bundle keys = %v, want [%s]", keys(xr.Bundles), want)
	}
	js, err := c.FetchJWTBundles(ctx, &workload.JWTBundlesRequest{})
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	jr, err := js.Recv()
	if err != nil {
		t.Fatalf("FetchJWTBundles recv: %v", err)
	}
	if _, ok := jr.Bundles[want]; !ok || len(jr.Bundles) != 1 {
		t.Fatalf("JWT bundle keys = %v, want [%s]", keys(jr.Bundles), want)
	}
}

func keys(m map[string][]byte) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
